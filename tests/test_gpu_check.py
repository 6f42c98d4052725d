"""The GPU check runs end to end in its CPU smoke mode, so it cannot rot between GPU windows."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def test_gpu_check_cpu_smoke(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(record["parts"]) == [
        "cuda-tests",
        "train-resume",
        "bench-smoke",
        "pixart-xl2-512",
        "latte-xl2-16f",
        "compile-switch",
    ]
    assert all(part["ok"] for part in record["parts"].values())
    assert record["parts"]["train-resume"]["bitwise"]  # stopped and resumed in new processes: the same weights
    assert record["parts"]["bench-smoke"]["report"]["train"][1]["mask_ratio"] == 0.75
    assert "pass" in proc.stdout.splitlines()[-3]
