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
from .training import Trainer

GUIDANCES = ("pdg", "cfg")
SHOWN = ("class_agreement", "fid", "precision", "recall", "is")


def run_demo(
    cfg: RunConfig, out: Path, per_class: int = 10, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
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
    log(
        f"demo: training {run.model.preset} on {run.data.name} "
        f"({', '.join(f'{s.name}: {s.steps} steps, mask {s.mask_ratio:g}' for s in run.stages)}) on {trainer.device}"
    )
    folder = trainer.fit()
    results: dict = {"train_seconds": time.perf_counter() - tic}
    labels, seeds = eval_labels_and_seeds(run.eval, classes)
    sampler, evaluator = trainer.sampling_run(), None
    for guidance in GUIDANCES:
        scfg = sampler.sample_config(guidance=guidance)
        images, seconds = sampler.generate(labels, seeds, scfg)
        rows = [i for c in range(classes) for i in range(c, classes * per_class, classes)]  # one row per class
        grid = save_grid(images[rows], out / f"demo_{guidance}.png", columns=per_class)
        quantised = to_uint8_nchw(images)
        evaluator = evaluator or Evaluator(
            run.eval, tuple(quantised.shape[1:]), trainer.device, reference_root(run.data)
        )
        scores = evaluator(quantised, torch.tensor(labels))
        results[guidance] = {"sample_seconds": seconds, "grid": str(grid), "guidance_scale": scfg.scale, **scores}
    network = evaluator.networks[0].name
    log(
        f"{len(labels)} samples per guidance ({run.sample.sampler}, {run.sample.steps} steps); {network} features vs "
        f"{evaluator.ref.source}:"
    )
    log(f"{'guidance':<14}{'seconds':>9}" + "".join(f"{name:>17}" for name in SHOWN))
    for guidance in GUIDANCES:
        r = results[guidance]
        metrics = r["metrics"][network]
        log(
            f"{guidance.upper() + ' scale ' + format(r['guidance_scale'], 'g'):<14}{r['sample_seconds']:>9.1f}"
            + "".join(f"{metrics[name]:>17.4f}" if name in metrics else f"{'-':>17}" for name in SHOWN)
        )
    log(f"grids (one row per class): {results['pdg']['grid']}, {results['cfg']['grid']}")
    return finish(results, start, folder, out, log)


def demo_trainer(cfg: RunConfig, out: Path, kind: str, data_name: str, progress: bool) -> Trainer:
    """The trainer of a text or video demo (one process, on the demo's own data), resuming `out` if it exists."""
    if env_world()[1] > 1:
        raise UserError("demo runs in one process; under torchrun use train and sample")
    if cfg.data.name != data_name:
        raise UserError(f"the {kind} demo trains on data.name {data_name}, not {cfg.data.name}")
    return Trainer(cfg, out, progress=progress)


def run_text_demo(
    cfg: RunConfig, out: Path, per_kind: int = 250, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Train a text-to-image config on compositional Fashion-MNIST into `out`, then sample `per_kind` captions of
    layouts seen in training and `per_kind` of held-out layouts with PDG and with CFG; scores: caption accuracy
    (every cell, and the filled cells alone) and the Frechet distance of the classifier's features of the whole
    canvas against real canvases. Writes out/demo.json, a grid per guidance and its captions."""
    from .layouts import FashionMNISTLayouts, caption_accuracy, caption_of, cell_contents
    from .metrics.fmnist_classifier import classify, load_classifier
    from .metrics.frechet import feature_stats, frechet_distance
    from .text import tokenize

    start = tic = time.perf_counter()
    trainer = demo_trainer(cfg, out, "text", "fashion_mnist_layouts", progress)
    run = trainer.cfg
    log(
        f"demo: training {run.model.preset} on captioned layouts "
        f"({', '.join(f'{s.name}: {s.steps} steps, mask {s.mask_ratio:g}' for s in run.stages)}) on {trainer.device}"
    )
    folder = trainer.fit()
    results: dict = {"train_seconds": time.perf_counter() - tic}
    kinds = {kind: FashionMNISTLayouts(run.data.root, kind) for kind in ("train", "held_out")}
    layouts = {kind: [data.item(i)[0] for i in range(per_kind)] for kind, data in kinds.items()}
    captions = [caption_of(layout) for kind in kinds for layout in layouts[kind]]
    ids = [tokenize(c, run.model.text.vocabulary, run.model.text.max_tokens) for c in captions]
    classifier = load_classifier(device=trainer.device)
    real = kinds["train"].load(torch.arange(len(ids)) + len(kinds["train"]) // 2)[0]  # real canvases (other indices)
    real_stats = feature_stats(classify(classifier, real)[0])
    sampler = trainer.sampling_run()
    for guidance in GUIDANCES:
        scfg = sampler.sample_config(guidance=guidance)
        images, seconds = sampler.generate(ids, list(range(len(ids))), scfg)
        images = images.clamp(-1, 1)
        r = {
            "sample_seconds": seconds,
            "guidance_scale": scfg.scale,
            "fid": frechet_distance(*feature_stats(classify(classifier, images)[0]), *real_stats),
        }
        for k, kind in enumerate(kinds):
            part, truth = images[k * per_kind : (k + 1) * per_kind], torch.tensor(layouts[kind])
            read = cell_contents(part, classifier)
            r[kind] = {
                "caption_accuracy": caption_accuracy(part, layouts[kind], classifier),
                "filled_cell_accuracy": (read == truth)[truth >= 0].float().mean().item(),
            }
        shown = slice(per_kind, per_kind + 64)  # held-out captions
        r["grid"] = str(save_grid(images[shown], out / f"demo_{guidance}.png", columns=8))
        atomic_write_text(out / f"demo_{guidance}_captions.txt", "\n".join(captions[shown]) + "\n")
        results[guidance] = r
    log(
        f"{per_kind} seen + {per_kind} held-out captions per guidance ({run.sample.sampler}, {run.sample.steps} "
        f"steps); "
        f"caption accuracy = share of the 4 cells read right (filled: the cells with a garment alone)"
    )
    log_text_table(results, log)
    log(
        f"grids (held-out captions, in demo_<guidance>_captions.txt, 8 per row): {results['pdg']['grid']}, "
        f"{results['cfg']['grid']}"
    )
    return finish(results, start, folder, out, log)


def finish(results: dict, start: float, folder: Path, out: Path, log: Callable[[str], None]) -> dict:
    """Every demo's last lines: the total time, where things are, and out/demo.json."""
    results["total_seconds"] = time.perf_counter() - start
    log(
        f"demo done in {results['total_seconds']:.0f}s (training {results['train_seconds']:.0f}s); checkpoints: "
        f"{folder.parent}; results: {out / 'demo.json'}"
    )
    atomic_write_text(out / "demo.json", json.dumps(results, indent=2) + "\n")
    return results


def log_text_table(results: dict, log: Callable[[str], None]) -> None:
    log(f"{'guidance':<14}{'seconds':>9}{'seen':>8}{'filled':>8}{'held-out':>10}{'filled':>8}{'FID':>9}")
    for guidance in GUIDANCES:
        r = results[guidance]
        log(
            f"{guidance.upper() + ' scale ' + format(r['guidance_scale'], 'g'):<14}{r['sample_seconds']:>9.1f}"
            f"{r['train']['caption_accuracy']:>8.1%}"
            f"{r['train']['filled_cell_accuracy']:>8.1%}{r['held_out']['caption_accuracy']:>10.1%}"
            f"{r['held_out']['filled_cell_accuracy']:>8.1%}{r['fid']:>9.2f}"
        )


def stage_speedup(run: RunConfig, metrics: list[dict]) -> tuple:
    """(the most masked stage on whole clips, {"steps_per_s", "stage1_speedup"}): its median steps/s over the dense
    stage's from the run's log (empty when the run has no such pair); stages on shorter clips are left out, so the
    speed-up compares like with like."""
    rates = stage_rates(metrics)
    whole = [s for s in run.stages if s.frames is None]
    masked, dense = max(whole, key=lambda s: s.mask_ratio), min(whole, key=lambda s: s.mask_ratio)
    if masked.mask_ratio > 0 and dense.mask_ratio == 0 and {masked.name, dense.name} <= rates.keys():
        return masked, {"steps_per_s": rates, "stage1_speedup": rates[masked.name] / rates[dense.name]}
    return masked, {}


def real_clip_scores(run: RunConfig, count: int, readers) -> tuple:
    """(frame statistics of `count` real test clips, the scores of the next `count` against them: the ceiling)."""
    from .moving import MovingFashionMNIST, real_frame_stats, score_clips

    real_data = MovingFashionMNIST(run.data.root, "test", run.data.frames)
    real, real_labels = real_data.load(torch.arange(count))
    real_stats = real_frame_stats(real, readers)
    others = real_frame_stats(real_data.load(torch.arange(count) + count)[0], readers)
    return real_stats, score_clips(real, real_labels, readers, others)


def log_video_table(results: dict, log: Callable[[str], None]) -> None:
    log(f"{'':<14}{'seconds':>9}{'frame class':>13}{'clip consistent':>17}{'path residual px':>18}{'frame FID':>11}")
    for name in ("real", *GUIDANCES):
        r = results[name]
        head = "real test clips" if name == "real" else f"{name.upper()} scale {r['guidance_scale']:g}"
        log(
            f"{head:<14}{r.get('sample_seconds', 0.0):>9.1f}{r['frame_class_agreement']:>13.1%}"
            f"{r['clip_consistency']:>17.1%}{r['path_residual_px']:>18.2f}{r['frame_fid']:>11.2f}"
        )


def stage_rates(rows: list[dict]) -> dict[str, float]:
    """Median logged steps per second of each stage (by name) in a run's metrics (the first log of a stage, which
    includes its start-up, left out)."""
    rates: dict[str, list[float]] = {}
    for previous, row in zip([None] + rows[:-1], rows):
        if "steps_per_s" in row and previous is not None and previous.get("stage") == row["stage"]:
            rates.setdefault(row["stage"], []).append(row["steps_per_s"])
    return {name: sorted(v)[len(v) // 2] for name, v in rates.items()}


def run_video_demo(
    cfg: RunConfig, out: Path, shown: int = 2, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Train a class-conditional video config on moving Fashion-MNIST into `out`, then sample eval.num_samples clips
    (classes cycling) with PDG and with CFG; scores (sprintdit.moving.score_clips) against real test clips, the
    same scores of real clips as the ceiling, and the stage-1 (masked) speed over the dense stage's from the run's
    log. Writes out/demo.json, a frame-strip grid (`shown` clips per class), one GIF per class and an npz per
    guidance."""
    from .images import save_gif, save_npz
    from .moving import load_readers, score_clips

    start = tic = time.perf_counter()
    trainer = demo_trainer(cfg, out, "video", "moving_fashion_mnist", progress)
    run = trainer.cfg
    log(
        f"demo: training {run.model.preset} on moving Fashion-MNIST clips {'x'.join(map(str, run.model.input_size))}, "
        f"{'x'.join(map(str, run.model.grid))} tokens "
        f"({', '.join(f'{s.name}: {s.steps} steps, mask {s.mask_ratio:g}' for s in run.stages)}) on {trainer.device}"
    )
    folder = trainer.fit()
    results: dict = {"train_seconds": time.perf_counter() - tic}
    masked, speed = stage_speedup(run, trainer.folder.metrics())
    results.update(speed)
    classes = run.model.num_classes
    labels, seeds = eval_labels_and_seeds(run.eval, classes)
    readers = load_readers(trainer.device)
    real_stats, results["real"] = real_clip_scores(run, len(labels), readers)
    # `shown` clips per class, a row each
    rows = [i for c in range(classes) for i in range(c, classes * shown, classes)]
    sampler = trainer.sampling_run()
    for guidance in GUIDANCES:
        scfg = sampler.sample_config(guidance=guidance)
        clips, seconds = sampler.generate(labels, seeds, scfg)
        clips = clips.clamp(-1, 1)
        r = {
            "sample_seconds": seconds,
            "guidance_scale": scfg.scale,
            **score_clips(clips, torch.tensor(labels), readers, real_stats),
        }
        r["grid"] = str(save_grid(clips[rows], out / f"demo_{guidance}.png", columns=1))
        r["npz"] = str(save_npz(clips, labels, out / f"demo_{guidance}.npz"))
        for c in range(classes):
            save_gif(clips[c], out / f"demo_{guidance}_gifs" / f"class{c}.gif")
        results[guidance] = r
    log(
        f"{len(labels)} clips per guidance ({run.sample.sampler}, {run.sample.steps} steps), read frame by frame "
        f"(sprintdit.moving.Readers):"
    )
    log_video_table(results, log)
    if "stage1_speedup" in results:
        log(
            f"stage {masked.name} (mask {masked.mask_ratio:g}) runs {results['stage1_speedup']:.2f}x the dense stage's "
            f"steps/s at the same clip size"
        )
    log(
        f"frame strips ({shown} clips per class, a row each): {results['pdg']['grid']}, {results['cfg']['grid']}; "
        f"GIFs: {out}/demo_<guidance>_gifs"
    )
    return finish(results, start, folder, out, log)
