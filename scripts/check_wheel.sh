#!/usr/bin/env bash
# The install a user gets: build the wheel, install it into a fresh venv outside the checkout, and train two
# steps and sample from a shipped config by name (configs, classifier weights and py.typed come from the wheel).
# Usage: scripts/check_wheel.sh PYTHON TORCH_SPEC
set -euo pipefail
python=$1 torch_spec=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
"$python" -m pip install -q "setuptools>=68"  # the build backend pyproject.toml names (a fresh venv may hold an older one)
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo" >/dev/null
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$torch_spec"
"$work/venv/bin/python" -m pip install -q "$work"/dist/sprintdit-*.whl
cd "$work"  # nothing of the checkout is importable from here
data=${FMNIST:-/usr/share/datasets/fashion-mnist}
tiny=(model.preset=SiT-Nano/4 model.hidden_size=32 train.batch_size=4 train.sample_every=0 "data.root=$data"
      "stages=[{name: pre, steps: 1, mask_ratio: 0.75}, {name: ft, steps: 1, mask_ratio: 0}]")
"$work/venv/bin/sprintdit" --version
"$work/venv/bin/sprintdit" train --config fashion_mnist_sprint --out run --no-progress "${tiny[@]}" >/dev/null
"$work/venv/bin/sprintdit" sample --checkpoint run --out samples --labels 0-1 --steps 2 --no-progress >/dev/null
"$work/venv/bin/python" -c "import sprintdit, pathlib; assert (pathlib.Path(sprintdit.__file__).parent / 'py.typed').is_file()"
compgen -G "samples/*.npz" >/dev/null  # the ADM batch was written
echo "wheel check: built, installed in a fresh venv, trained 2 steps and sampled in $(( $(date +%s) - start ))s"
