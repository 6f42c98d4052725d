"""One GPU check that proves the CUDA paths and measures the speed targets (issue 16); run it with scripts/gpu_check.sh.

Parts, in order, each reporting pass/fail and never stopping the rest:
  1. cuda-tests     the test suite's CUDA-marked tests (pytest -m cuda)
  2. train-resume   a short two-stage run of a small preset on Fashion-MNIST-shaped random data, stopped after
                    its first stage and resumed in a new process, against an uninterrupted run (max difference)
  3. bench-*        `sprintdit bench`: SiT-XL/2 at 256 px (batch 64) and 512 px (batch 32), mask 0 and 0.75,
                    bf16, compiled, with CFG vs PDG; the small-scale model (width 384, 12 blocks 2/8/2, 256 tokens,
                    batch 256; also with CUDA graphs, compile mode reduce-overhead); video: SiT-XL/2 on 16-frame clips
  4. pixart-xl2-512 PixArt-alpha-XL/2 at 512 px (random weights in the release's shapes), bf16, compiled: dense vs
                    SparseDiT (grid 12:20, the paper's 6:10 at twice the side) sampling img/s and peak memory (the
                    paper: 0.414 -> 0.701 img/s), and its SPRINT-adapted masked training step
  5. latte-xl2-16f  Latte-XL/2's shape (factorised space / time blocks, 16 frames of 256 px), bf16, eager: training
                    step dense and at mask 0.75, CFG vs PDG, dense vs SparseDiT (grid 6:10, 2 + 1 x (1, 21, 1, 1):
                    the layout whose FLOPs match the paper's -56% for Latte) sampling img/s and peak memory
  6. compile-switch a compiled two-stage run: its graphs built before step 1 (Trainer.build_graphs), none while
                    training across the stage switch
Everything goes to OUT/gpu_check.json; a table is printed last. `--cpu-smoke` runs the same parts at tiny sizes
on the CPU in seconds (the test suite does, so the check cannot rot); compiled parts are skipped there.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import struct
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801
RANDOM_IMAGES = 512  # Fashion-MNIST-shaped random training images (28x28, 10 classes)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def random_fashion_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (RANDOM_IMAGES, 28, 28)), IDX_IMAGES)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(RANDOM_IMAGES) % 10, IDX_LABELS)
    return folder


def sprintdit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sprintdit", *args], capture_output=True, text=True, cwd=REPO)


# ----------------------------------------------------------------------------------- parts


def cuda_tests(smoke: bool, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    return {"ok": proc.returncode in (0, 5), "summary": last}  # 5: nothing collected


def train_resume(smoke: bool, work: Path) -> dict:
    data = random_fashion_mnist(work / "fmnist")
    size = (
        ["model.preset=SiT-Nano/4", "model.hidden_size=32", "train.batch_size=8"]
        if smoke
        else ["model.preset=SiT-S/2", "train.batch_size=256", "train.precision=bf16"]
    )
    steps = (3, 2) if smoke else (60, 20)
    args = [
        f"data.root={data}",
        "train.sample_every=0",
        "train.log_every=1",
        *size,
        f"stages=[{{name: pre, steps: {steps[0]}, lr: 0.001, mask_ratio: 0.75}}, "
        f"{{name: ft, steps: {steps[1]}, lr: 0.0005, mask_ratio: 0}}]",
    ]
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [steps[0], None])):
        for stop in stops:
            extra = ["--stop-at", str(stop)] if stop else []
            proc = sprintdit(
                "train", "--config", "fashion_mnist_sprint", "--out", str(work / name), "--no-progress", *args, *extra
            )
            if proc.returncode:
                return {"ok": False, "summary": f"{name}: {proc.stderr.strip().splitlines()[-1]}"}
        runs[name] = work / name
    from safetensors.torch import load_file

    from sprintdit.checkpoint import list_checkpoints

    diffs = []
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(list_checkpoints(runs[n])[-1] / file)) for n in ("straight", "resumed"))
        diffs += [(a[k].float() - b[k].float()).abs().max().item() for k in a]
    worst = max(diffs)
    losses = [
        json.loads(line)["loss"]
        for line in (runs["straight"] / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    # bitwise on CPU; on a GPU non-deterministic kernels (atomics in backward) may differ in the last bits
    tolerance = 0.0 if smoke else 1e-3
    return {
        "ok": worst <= tolerance,
        "max_abs_diff": worst,
        "bitwise": worst == 0.0,
        "tolerance": tolerance,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "summary": f"resumed vs straight: max |diff| {worst:.3g} (tolerance {tolerance:g})",
    }


def bench(smoke: bool, work: Path, name: str, args: list[str]) -> dict:
    out = work / f"{name}.json"
    proc = sprintdit("bench", *args, "--out", str(out))
    if proc.returncode:
        return {"ok": False, "summary": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    report = json.loads(out.read_text())
    steps = "; ".join(
        f"mask {r['mask_ratio']:g}: {r['step_ms']:.1f} ms, MFU {r['mfu']:.0%}, x{r['speedup_vs_dense']:.2f}"
        for r in report["train"]
    )
    pdg = report["sample"].get("pdg_speedup_vs_cfg")
    return {"ok": True, "report": report, "summary": f"{steps}; PDG vs CFG step x{pdg:.2f}" if pdg else steps}


def bench_parts(smoke: bool) -> list[tuple[str, list[str]]]:
    if smoke:
        tiny = [
            "--preset",
            "SiT-Nano/4",
            "--resolution",
            "32",
            "--latent-factor",
            "1",
            "--channels",
            "1",
            "--num-classes",
            "10",
            "--batch",
            "4",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--sample-steps",
            "2",
            "--mask-ratios",
            "0,0.75",
            "--device",
            "cpu",
        ]
        return [("bench-smoke", tiny)]
    common = [
        "--mask-ratios",
        "0,0.75",
        "--precision",
        "bf16",
        "--compile",
        "--warmup",
        "3",
        "--repeats",
        "10",
    ]  # compiling dominates: few repeats
    return [
        ("bench-xl2-256", ["--preset", "SiT-XL/2", "--resolution", "256", "--batch", "64", *common]),
        ("bench-xl2-512", ["--preset", "SiT-XL/2", "--resolution", "512", "--batch", "32", *common]),
        ("bench-small-256tok", ["--preset", "SiT-S/2", "--resolution", "256", "--batch", "256", *common]),
        (
            "bench-small-256tok-cudagraphs",
            [
                "--preset",
                "SiT-S/2",
                "--resolution",
                "256",
                "--batch",
                "256",
                *common,
                "--compile-mode",
                "reduce-overhead",
            ],
        ),
        # video at Latte's size (16 frames of 256 px latents, 4096 tokens), eager: the token count where dropping pays
        # most
        (
            "bench-video-16f",
            [
                "--preset",
                "SiT-XL/2",
                "--resolution",
                "256",
                "--frames",
                "16",
                "--batch",
                "4",
                "--mask-ratios",
                "0,0.75",
                "--precision",
                "bf16",
                "--warmup",
                "2",
                "--repeats",
                "5",
            ],
        ),
    ]


def pixart_dense_vs_sparsedit(smoke: bool, work: Path) -> dict:
    """PixArt-alpha-XL/2 at 512 px (random weights, the release's shapes: 1024 tokens, 120 T5 tokens), bf16, compiled:
    dense vs SparseDiT sampling img/s and peak memory (the paper: 0.414 -> 0.701 img/s, +69%), and the SPRINT
    adapter's masked training step."""
    from sprintdit.checkpoint import save_weights_folder
    from sprintdit.config import to_yaml
    from sprintdit.convert import run_config
    from sprintdit.models import SiT
    from sprintdit.pixart import PIXART_CAPTION_TOKENS, pixart_model_config

    xl = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, caption_channels=4096, sample_size=64)
    tiny = dict(num_attention_heads=2, attention_head_dim=12, num_layers=8, caption_channels=16, sample_size=8)
    config = {"in_channels": 4, "out_channels": 8, "use_additional_conditions": False, **(tiny if smoke else xl)}
    mc = pixart_model_config(config, None, PIXART_CAPTION_TOKENS)
    with torch.device("meta"):
        shapes = SiT(mc).state_dict()
    weights = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    run = save_weights_folder(work / "pixart-run", weights, weights, to_yaml(run_config(mc, "diffusers")))
    size = ["--batch", "2", "--warmup", "1", "--repeats", "2", "--sample-steps", "2", "--device", "cpu"]
    full = [
        "--batch",
        "8",
        "--precision",
        "bf16",
        "--compile",
        "--warmup",
        "2",
        "--repeats",
        "5",
        "--sample-steps",
        "20",
    ]
    grids = ["--sparse-grids", "2:3" if smoke else "12:20", "--sparse-layout", "1,1,1,1" if smoke else "2,4,3,1"]
    result = bench(smoke, work, "bench-pixart", ["--model-from", str(run), "--mask-ratios", "0,0.75", *grids,
                                                 *(size if smoke else full)])  # fmt: skip
    return with_sparsedit_summary(result)


def latte_dense_vs_sparsedit(smoke: bool, work: Path) -> dict:
    """Latte-XL/2's shape (width 1152, 28 blocks alternating space / time, 16 frames of 256 px: 16 x 16 tokens a
    frame), bf16, eager: the training step dense and at SPRINT's mask 0.75 (the same positions in every frame), CFG
    vs PDG, and SparseDiT with the layout whose FLOPs match the paper's -56% (2 Poolingformers, one module of merge +
    21 sparse + recover + 1 dense, grid 6:10) against dense, in sampling img/s and peak memory."""
    shape = ["--video-layout", "factorised", "--mask-ratios", "0,0.75", "--sparse-grids"]
    if smoke:
        args = ["--preset", "SiT-Nano/4", "--resolution", "32", "--latent-factor", "1", "--channels", "1",
                "--num-classes", "10", "--frames", "4", *shape, "2:3", "--sparse-layout", "0,1,1,1", "--batch", "2",
                "--warmup", "1", "--repeats", "1", "--sample-steps", "2", "--device", "cpu"]  # fmt: skip
    else:
        args = ["--preset", "SiT-XL/2", "--resolution", "256", "--frames", "16", *shape, "6:10", "--sparse-layout",
                "2,1,21,1", "--batch", "2", "--precision", "bf16", "--warmup", "2", "--repeats", "5",
                "--sample-steps", "20"]  # fmt: skip
    return with_sparsedit_summary(bench(smoke, work, "bench-latte", args))


def with_sparsedit_summary(result: dict) -> dict:
    """A bench part's summary led by its SparseDiT rows: dense and sparse img/s, peak memory, speed-up."""
    if result["ok"]:
        rows = result["report"]["sparsedit"]
        mem = ["-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB" for r in rows]
        result["summary"] = (
            f"dense {rows[0]['images_per_s']:.3f} img/s ({mem[0]}), SparseDiT {rows[1]['grid']} "
            f"{rows[1]['images_per_s']:.3f} img/s ({mem[1]}, x{rows[1]['speedup_vs_dense']:.2f}, "
            f"{rows[1]['flops_vs_dense']:.0%} of the FLOPs); {result['summary']}"
        )
    return result


def compile_switch(smoke: bool, work: Path) -> dict:
    if smoke:
        return {"ok": True, "skipped": True, "summary": "skipped in --cpu-smoke (compiling takes minutes on a CPU)"}
    import torch._dynamo

    from sprintdit.config import load_config
    from sprintdit.training import Trainer, total_steps

    data = random_fashion_mnist(work / "fmnist")
    cfg = load_config(
        "fashion_mnist_sprint",
        [
            f"data.root={data}",
            "model.preset=SiT-S/2",
            "train.batch_size=256",
            "train.precision=bf16",
            "train.compile=true",
            "train.sample_every=0",
            "stages=[{name: pre, steps: 20, mask_ratio: 0.75}, {name: ft, steps: 20, mask_ratio: 0}]",
        ],
    )
    torch._dynamo.reset()
    trainer = Trainer(cfg, work / "compiled", progress=False)
    trainer.build_graphs(total_steps(cfg))  # what fit does first: every stage's graph before the first step
    built = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs", 0)
    trainer.fit()  # both stages, across the switch
    graphs = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs", 0) - built
    return {
        "ok": graphs == 0,
        "graphs_built_up_front": built,
        "new_graphs_while_training": graphs,
        "summary": f"{built} graphs built before step 1, {graphs} new while training (the stage switch included)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and the parts' files")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --cpu-smoke", file=sys.stderr)
        return 2
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    parts = [("cuda-tests", cuda_tests), ("train-resume", train_resume)]
    parts += [(name, lambda s, w, n=name, a=a: bench(s, w, n, a)) for name, a in bench_parts(smoke)]
    parts += [("pixart-xl2-512", pixart_dense_vs_sparsedit), ("latte-xl2-16f", latte_dense_vs_sparsedit)]
    parts += [("compile-switch", compile_switch)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else f"CPU {platform.machine()}"
    record = {
        "device": device,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "smoke": smoke,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "parts": {},
    }
    for name, part in parts:
        tic = time.perf_counter()
        try:
            result = part(smoke, work)
        except Exception as err:  # a part that breaks is reported, the others still run
            result = {
                "ok": False,
                "summary": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                "traceback": traceback.format_exc(),
            }
        result["seconds"] = round(time.perf_counter() - tic, 1)
        record["parts"][name] = result
        (work / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['device']}, torch {record['torch']}, {record['date']}{' (cpu smoke)' if smoke else ''}")
    for name, r in record["parts"].items():
        print(f"{name:<20}{'pass' if r['ok'] else 'FAIL':<6}{r['seconds']:>8.1f}s  {r.get('summary', '')}")
    print(f"written: {work / 'gpu_check.json'}")
    return 0 if all(r["ok"] for r in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
