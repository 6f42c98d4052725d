"""`sprintdit demo`: train a config in all its stages, then sample the same labels and seeds with PDG and with CFG,
score both and write one grid per guidance (a row per class) and demo.json."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from .config import RunConfig, reference_root
from .distributed import env_world
from .errors import UserError
from .evaluate import Evaluator, eval_labels_and_seeds, to_uint8_nchw
from .files import atomic_write_text
from .images import save_grid
from .sampling import SampleConfig, generate
from .trainer import Trainer

GUIDANCES = ("pdg", "cfg")
SHOWN = ("class_agreement", "fid", "precision", "recall", "is")


def run_demo(cfg: RunConfig, out: Path, per_class: int = 10, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` into `out` (resuming if it exists), then sample and score eval.num_samples images per guidance;
    returns (and writes to out/demo.json) the timings and scores."""
    if env_world()[1] > 1:
        raise UserError("demo runs in one process; under torchrun use train, sample and evaluate")
    start = tic = time.perf_counter()
    trainer = Trainer(cfg, out, progress=progress)
    run = trainer.cfg
    classes = run.model.num_classes
    if run.eval.num_samples < classes * per_class:
        raise UserError(f"eval.num_samples {run.eval.num_samples} is below {classes} classes x --per-class {per_class}")
    log(f"demo: training {run.model.preset} on {run.data.name} ({', '.join(f'{s.name}: {s.steps} steps, mask {s.mask_ratio:g}' for s in run.stages)}) on {trainer.device}")
    folder = trainer.fit()
    results: dict = {"train_seconds": time.perf_counter() - tic}
    labels, seeds = eval_labels_and_seeds(run.eval, classes)
    evaluator = None
    for guidance in GUIDANCES:
        scfg = SampleConfig(**{**vars(run.sample), "guidance": guidance})
        tic = time.perf_counter()
        images = generate(trainer.ema.eval(), trainer.objective, labels, seeds, scfg, trainer.device)
        seconds = time.perf_counter() - tic
        rows = [i for c in range(classes) for i in range(c, classes * per_class, classes)]  # one row per class
        grid = save_grid(images[rows], out / f"demo_{guidance}.png", columns=per_class)
        quantised = to_uint8_nchw(images)
        evaluator = evaluator or Evaluator(run.eval, tuple(quantised.shape[1:]), trainer.device, reference_root(run.data))
        scores = evaluator(quantised, torch.tensor(labels))
        results[guidance] = {"sample_seconds": seconds, "grid": str(grid), "guidance_scale": scfg.scale, **scores}
    network = evaluator.networks[0].name
    log(f"{len(labels)} samples per guidance ({run.sample.sampler}, {run.sample.steps} steps); {network} features vs {evaluator.ref.source}:")
    log(f"{'guidance':<14}{'seconds':>9}" + "".join(f"{name:>17}" for name in SHOWN))
    for guidance in GUIDANCES:
        r = results[guidance]
        metrics = r["metrics"][network]
        log(f"{guidance.upper() + ' scale ' + format(r['guidance_scale'], 'g'):<14}{r['sample_seconds']:>9.1f}"
            + "".join(f"{metrics[name]:>17.4f}" if name in metrics else f"{'-':>17}" for name in SHOWN))
    log(f"grids (one row per class): {results['pdg']['grid']}, {results['cfg']['grid']}")
    results["total_seconds"] = time.perf_counter() - start
    log(f"demo done in {results['total_seconds']:.0f}s (training {results['train_seconds']:.0f}s); checkpoints: {folder.parent}; results: {out / 'demo.json'}")
    atomic_write_text(out / "demo.json", json.dumps(results, indent=2) + "\n")
    return results
