#!/usr/bin/env bash
# Behaviour-unchanged check for restructurings: a shortened demo (fashion_mnist_sprint, 60 + 20 steps, a loss record
# every step, a sample grid and an evaluation of 100 samples at steps 40 and 80) and the sha256 of its (step, loss)
# records, its evaluation records and its last grid. Run it before and after a change on the same machine: the three
# hashes must agree (CPU; 2026-12-07: 524dea64fb08 / 9770dfaebf1b / 50a175c7b0f0; another machine, the same code:
# 5805ab350048 / cf13a2600dbe / 73d2d44b86d6; float results depend on the machine, so compare on one. The evaluation
# records gained `is_std` with the IS split convention: e04e362f3923 there, every value unchanged).
# Usage: scripts/demo_identity.sh [OUT]   (default /tmp/sprintdit-identity; uses .venv's python)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/sprintdit-identity}
py=${PYTHON:-$repo/.venv/bin/python}
rm -rf "$out"
"$py" -m sprintdit train --config fashion_mnist_sprint --out "$out" --no-progress stages.0.steps=60 stages.1.steps=20 \
    train.log_every=1 train.sample_every=40 eval.every=40 eval.num_samples=100 > "$out.log" 2>&1
"$py" - "$out" <<'PY'
import hashlib, json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
evals = [(r["step"], {k: v for k, v in r.items() if "/" in k}) for r in rows if "eval_samples" in r]
sha = lambda b: hashlib.sha256(b).hexdigest()[:12]
grid = sha(open(sys.argv[1] + "/samples/step_00000080.png", "rb").read())
print(f"{len(loss)} losses {sha(json.dumps(loss).encode())} | evaluations {sha(json.dumps(evals).encode())} | grid {grid}")
PY
