#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): CUDA tests, a train/stop/resume run, the benchmarks, compiles at a stage
# switch; OUT/gpu_check.json and a table. Runs on a machine's own Python and PyTorch: packages it lacks are
# installed from wheels in .whl/ beside the repo (fill it on a networked machine, for the target's Python, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # omegaconf's one dependency, sdist only
# ). Usage: scripts/gpu_check.sh [--cpu-smoke] [--out DIR]
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/sprintdit-site}
missing=()
for module in omegaconf yaml safetensors tqdm PIL scipy matplotlib numpy; do
    "$python" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}; installing the wheels in $repo/.whl into $site"
    ls "$repo"/.whl/*.whl >/dev/null 2>&1 || { echo "no wheels in $repo/.whl: see the pip download line at the top of $0"; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$repo"/.whl/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    ls "$repo"/.whl/*.whl | xargs -n1 basename | sed 's/^/  used: /'
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$repo/scripts/gpu_check.py" "$@"
