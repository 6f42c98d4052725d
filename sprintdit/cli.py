"""Command line: `sprintdit prepare | train | sample | evaluate | bench | convert | export | sparsify | demo | study |
plot`. A thin
layer over the library; user mistakes end in one `error: ...` line and exit code 2. `train`, `sample` and
`evaluate --checkpoint` also run under torchrun (see docs/distributed.md): the work is split over the
ranks and rank 0 writes and prints."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import Stopped, UserError

DEMO_CONFIG = "fashion_mnist_sprint"
PLOT_NAME = "runs.png"  # plot: the chart's name (inside --out when that is a folder)
GRID_MAX = 400  # sample: images in the PNG grid at most (1000 classes x 50 at 256 px would be a 10 GB grid)


def parse_ints(text: str, what: str, limit: int | None = None) -> list[int]:
    """'0,3,5' or '0-9' (inclusive range) or a mix: '0-2,7'; more than `limit` numbers are refused before any list is
    built."""
    ranges = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            ranges.append((int(lo), int(hi or lo)))
            if ranges[-1][1] < ranges[-1][0]:
                raise UserError(f"{what}: the range {part!r} is empty (write LOW-HIGH with LOW <= HIGH)")
    except ValueError:
        raise UserError(f"{what} must be non-negative integers like 0,3,5 or 0-9, got {text!r}") from None
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if limit is not None and count > limit:
        raise UserError(f"{what} {text!r} gives {count} numbers; at most {limit} (split the job into several calls)")
    return [n for lo, hi in ranges for n in range(lo, hi + 1)]


def prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images",
        required=True,
        help="image tree, one sub-folder per class (ImageNet train layout); with --captions any images under it",
    )
    p.add_argument(
        "--out",
        required=True,
        help="latent folder: shard_*.safetensors, their .json sidecars and manifest.json; re-run to resume",
    )
    p.add_argument(
        "--vae",
        help="local AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema: config.json + weights); without it, only "
        "--captions' embeddings",
    )
    p.add_argument(
        "--captions",
        help='captions.jsonl ({"file": ..., "caption": ...} per line): store the captions\' embeddings for '
        "model.text.encoder t5 | clip",
    )
    p.add_argument("--text-encoder", help="t5 (default) | clip: the encoder at --text-encoder-path")
    p.add_argument(
        "--text-encoder-path",
        help="local transformers folder of the text encoder (e.g. DeepFloyd/t5-v1_1-xxl, as PixArt-alpha)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        help="caption tokens kept (default 120, PixArt-alpha's; CLIP: 77); longer ones are truncated",
    )
    p.add_argument("--resolution", type=int, help="image side after ADM's centre crop (default 256)")
    p.add_argument(
        "--clips",
        action="store_true",
        default=None,
        help="--images is a clip folder (class sub-folders of .npy clips or frame folders; with --captions any "
        "clips under it, keyed by their paths): every frame is encoded with the VAE",
    )
    p.add_argument("--frames", type=int, help="with --clips: frames per clip (default: the first clip's)")
    p.add_argument("--shard-size", type=int, help="images per shard (default 10000)")
    p.add_argument("--batch-size", type=int, help="images per encoder forward (default 32)")
    p.add_argument(
        "--dinov2-weights",
        help="DINOv2 weights (e.g. dinov2_vitb14_pretrain.pth): also store its patch tokens for REPA",
    )
    p.add_argument(
        "--dinov2-model",
        default="ViT-B/14",
        help="DINOv2 size of --dinov2-weights: ViT-S/14 | ViT-B/14 (default, REPA's) | ViT-L/14 | ViT-g/14",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        help="patch size of the model to be trained: DINOv2 tokens form a (latent side / patch) grid (default 2)",
    )
    p.add_argument("--device", help="auto (default: this rank's GPU if present) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args) -> int:
    from .prepare import FeatureEncoder, PrepareConfig, prepare

    keys = (
        "vae",
        "resolution",
        "shard_size",
        "batch_size",
        "patch_size",
        "device",
        "captions",
        "text_encoder",
        "text_encoder_path",
        "max_tokens",
        "clips",
        "frames",
    )
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    # its defaults for the rest
    cfg = PrepareConfig(images=args.images, out=args.out, progress=not args.no_progress, **given)
    features = None
    if args.dinov2_weights is not None:
        from .metrics.dinov2 import load_dinov2

        features = FeatureEncoder(
            load_dinov2(args.dinov2_weights, args.dinov2_model), args.dinov2_model, args.dinov2_weights
        )
    from .distributed import process_group_from_env

    with process_group_from_env():
        result = prepare(cfg, features)
    if result.manifest is not None and cfg.vae is None:
        print(f"caption embeddings: {result.manifest} (train pixels on them with data.captions={cfg.out})")
    elif result.manifest is not None:
        import json

        manifest = json.loads(result.manifest.read_text())
        print(
            f"{manifest['count']} images in {len(manifest['shards'])} shards (encoded {len(result.encoded)}, kept "
            f"{len(result.kept)}); "
            f"{len(manifest['skipped'])} unreadable images skipped; manifest: {result.manifest}"
        )
    return 0


def train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML config file, or the name of one shipped in sprintdit/configs/ (e.g. fashion_mnist_sprint)",
    )
    p.add_argument("--out", help="run folder (default runs/<config name>); an existing one is resumed")
    p.add_argument("--stop-at", type=int, help="stop after this global step (with a checkpoint); re-run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.batch_size=32 stages.0.steps=100",
    )


def cmd_train(args) -> int:
    return on_ranks(train_on_ranks, args)


def train_on_ranks(args) -> int:
    from .config import load_config
    from .training import Trainer

    if args.config is None and args.out is None:
        raise UserError("give --config CONFIG to start a run, or --out RUN_DIR to resume one")
    if args.config is None and args.overrides:
        raise UserError("overrides need --config (a resumed run keeps its saved config)")
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at must be a step >= 1, got {args.stop_at}")
    cfg = load_config(args.config, args.overrides) if args.config else None
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    trainer = Trainer(cfg, out, progress=not args.no_progress)  # joins torchrun's process group, if any
    if trainer.dist.is_main:
        print(trainer.summary(), flush=True)
    start = trainer.step
    folder = trainer.fit(stop_at=args.stop_at)
    if trainer.dist.is_main:
        print(f"trained steps {start}..{trainer.step} in {out}; latest checkpoint: {folder}")
        written = [f"{name}: {out / name}" for name in ("metrics.jsonl", "samples") if (out / name).exists()]
        if written:
            print("  ".join(written))
    return 0


def sample_settings(args) -> dict:
    """The sampling options given on the command line (None: keep the checkpoint's)."""
    names = ("sampler", "steps", "guidance", "scale", "batch_size", "timestep_spacing", "middle_keep", "middle_mask")
    given = {k: getattr(args, k) for k in names}
    for name in ("interval", "middle_interval"):
        text = getattr(args, name)
        if text is not None:
            try:
                given[name] = [float(v) for v in text.split(",")]
            except ValueError:
                raise UserError(f"--{name.replace('_', '-')} must be LOW,HIGH, got {text!r}") from None
    return given


def setting_tag(scfg, args) -> str:
    """File-name part for the sampling settings: guidance, sampler, steps, scale, then a --sparse-grid override and a
    thinned SPRINT middle (keep schedule, mask choice, interval), so outputs of other settings sit side by side."""
    from .density import parse_keep

    tag = f"{scfg.guidance}_{scfg.sampler}{scfg.steps}_s{scfg.scale:g}{grid_tag(args)}"
    if parse_keep(scfg.middle_keep).dense:
        return tag
    interval = "" if scfg.middle_interval == [0.0, 1.0] else "_t" + "-".join(f"{v:g}" for v in scfg.middle_interval)
    return f"{tag}_keep{re.sub(r'[^0-9.]+', '-', scfg.middle_keep)}_{scfg.middle_mask}{interval}"


def grid_tag(args) -> str:
    """File-name part for a --sparse-grid override ("6:10" -> "_grid6-10"), so its outputs sit beside the default's."""
    return "" if args.sparse_grid is None else "_grid" + re.sub(r"[^0-9.]+", "-", args.sparse_grid)


def on_ranks(command, args) -> int:
    """Run a command that may join torchrun's process group, and leave the group however it ends."""
    from .distributed import shutdown

    try:
        return command(args)
    finally:
        shutdown()


def sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder (latest checkpoint), checkpoint folder or .safetensors file"
    )
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--labels", help="class labels, e.g. 0,3,5 or 0-9 (default: every class)")
    p.add_argument("--prompt", action="append", help="text models: a caption to sample (repeat for more)")
    p.add_argument("--prompts", help="text models: a file of captions, one per line")
    p.add_argument(
        "--text-encoder-path",
        help="text models on t5 / clip embeddings: the encoder folder (default: the run's model.text.path)",
    )
    p.add_argument(
        "--per-label",
        type=int,
        default=1,
        help="samples per label or prompt (default 1); the grid has one row per label or prompt",
    )
    p.add_argument("--seeds", help="one seed per sample, e.g. 0-99 (default: consecutive from --seed-start)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    add_sampling_options(p)
    p.add_argument(
        "--grid-max",
        type=int,
        default=GRID_MAX,
        help=f"images in the PNG grid at most (whole rows; default {GRID_MAX}; 0: no grid)",
    )


def cmd_sample(args) -> int:
    return on_ranks(sample_on_ranks, args)


def read_prompts(args) -> list[str]:
    """--prompt (repeatable), then the lines of --prompts FILE (blank lines skipped)."""
    from .files import read_utf8

    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path} does not exist (one prompt per line)")
        prompts += [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    return prompts


def sample_on_ranks(args) -> int:
    from .api import MAX_SAMPLES, sample_conditions
    from .sampling_run import SamplingRun
    from .files import check_writable_folder
    from .images import save_samples

    out = check_writable_folder(args.out, "--out")
    labels = None if args.labels is None else parse_ints(args.labels, "--labels", MAX_SAMPLES)
    seeds = parse_ints(args.seeds, "--seeds", MAX_SAMPLES) if args.seeds else None
    prompts = read_prompts(args) or None
    run = SamplingRun.open(
        args.checkpoint, use_ema=not args.no_ema, device=args.device, sparse_grid=args.sparse_grid, vae=args.vae
    )
    scfg = run.sample_config(**sample_settings(args))
    conditions = sample_conditions(
        run.config.model, labels, prompts, args.per_label, args.text_encoder_path, run.dist.device, run.model
    )
    seeds = seeds or list(range(args.seed_start, args.seed_start + len(conditions)))
    images, seconds = run.generate(conditions, seeds, scfg, progress=not args.no_progress)
    if images is None:  # not rank 0
        return 0
    stem = setting_tag(scfg, args)
    written = save_samples(images, out / stem, None if prompts else conditions, prompts, args.per_label, args.grid_max)
    d = run.dist
    where = f"{d.world_size} ranks ({d.device.type})" if d.active else str(d.device)
    print(
        f"{len(conditions)} samples in {seconds:.1f}s ({len(conditions) / seconds:.2f} img/s) on {where}; "
        f"{'; '.join(written)}"
    )
    return 0


def eval_config(args, base):
    """The eval section of a run (or the defaults) with the command line's choices on top."""
    from dataclasses import replace

    from .config import validate_eval

    keys = (
        "num_samples",
        "seed_start",
        "ref",
        "inception_weights",
        "inception_resize",
        "dinov2_weights",
        "dinov2_model",
        "is_split_size",
    )
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.features is not None:
        given["features"] = [f.strip() for f in args.features.split(",")]
    if args.eval_batch_size is not None:
        given["batch_size"] = args.eval_batch_size
    cfg = replace(base, **given)
    validate_eval(cfg)
    return cfg


def evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", help="run folder, checkpoint folder or .safetensors file: generate --num-samples and score them"
    )
    p.add_argument(
        "--samples", help="score an existing batch: npz in the ADM layout (uint8 NHWC arr_0, labels arr_1 optional)"
    )
    p.add_argument(
        "--ref",
        help="reference npz: images (arr_0) and/or statistics (mu/sigma, mu_s/sigma_s); default for Fashion-MNIST: its "
        "test split",
    )
    p.add_argument("--num-samples", type=int, help="samples to generate (default: the run's eval.num_samples, 1000)")
    p.add_argument("--seed-start", type=int, help="sample i uses seed SEED_START + i (default 0)")
    p.add_argument(
        "--features", help="feature networks, comma-separated: auto | fmnist | inception | dinov2 (default auto)"
    )
    p.add_argument(
        "--inception-weights", help="InceptionV3 FID weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
    )
    p.add_argument(
        "--inception-resize", help="tf (default): as the ADM evaluator and torch-fidelity; pytorch-fid: torch bilinear"
    )
    p.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) for FDD")
    p.add_argument(
        "--dinov2-model", help="DINOv2 size of --dinov2-weights: ViT-S/14 | ViT-B/14 | ViT-L/14 (default) | ViT-g/14"
    )
    p.add_argument(
        "--is-split-size",
        type=int,
        help="Inception Score over consecutive splits of this many samples (default 5000, the ADM evaluator's; 0: one "
        "split)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print two results side by side with their differences; refused if they were scored under different "
        "conventions (samples, reference, feature weights, resize, IS split)",
    )
    p.add_argument("--data-root", help="Fashion-MNIST folder for the default reference (default: the run's data.root)")
    p.add_argument("--eval-batch-size", type=int, help="images per feature-network forward")
    p.add_argument(
        "--write-ref",
        help="with --samples REAL.npz: write a reference batch (the images and each network's statistics) here",
    )
    p.add_argument("--save-samples", action="store_true", help="also write the generated batch as an ADM-layout npz")
    add_sampling_options(p)


def cmd_evaluate(args) -> int:
    return on_ranks(evaluate_on_ranks, args)


def evaluate_on_ranks(args) -> int:
    if args.compare is not None:
        if args.checkpoint is not None or args.samples is not None:
            raise UserError("--compare A.json B.json compares two results: give it without --checkpoint or --samples")
        return compare_files(*args.compare)
    if (args.checkpoint is None) == (args.samples is None):
        raise UserError("give either --checkpoint RUN (generate, then score) or --samples SAMPLES.npz (score a batch)")
    if args.write_ref is not None and args.samples is None:
        raise UserError("--write-ref turns a batch of real images into a reference: give it with --samples REAL.npz")
    return evaluate_batch(args) if args.samples is not None else evaluate_checkpoint(args)


def evaluate_batch(args) -> int:
    """Score (or, with --write-ref, turn into a reference) an npz batch; rank 0's job alone."""
    from .config import DataConfig, EvalConfig
    from .distributed import env_world, pick_device
    from .evaluate import Evaluator, NpzBatch, build_networks, choose_networks, write_reference
    from .files import check_writable_file, sha256_file

    if env_world()[0] != 0:
        return 0
    device = pick_device(args.device)
    cfg = eval_config(args, EvalConfig())
    if args.write_ref is not None and not Path(args.write_ref).parent.is_dir():
        raise UserError(
            f"--write-ref {args.write_ref}: folder {Path(args.write_ref).parent} does not exist; create it first"
        )
    out = check_writable_file(
        args.write_ref or Path(args.samples).with_suffix(".eval.json"),
        "--write-ref" if args.write_ref else "the scores file",
    )
    batch = NpzBatch(args.samples)
    if batch.shape is None:
        raise UserError(
            f"{args.samples} has no arr_0 (the ADM layout keeps the images there); it holds "
            f"{', '.join(sorted(batch.keys)) or 'nothing'}"
        )
    labels, shape = batch.labels(), batch.shape
    if args.write_ref is not None:
        names = choose_networks(cfg, shape[1:])
        written = write_reference(batch.images(), build_networks(names, cfg, device), out)
        print(f"reference batch of {shape[0]} images with {', '.join(names)} statistics: {written}")
        return 0
    evaluator = Evaluator(cfg, shape[1:], device, args.data_root or DataConfig().root)
    results = evaluator.score_blocks(batch.image_blocks(cfg.batch_size), shape, labels)
    results["provenance"]["setting"] = {"samples": str(args.samples), "samples_sha256": sha256_file(args.samples)}
    return write_results(results, out)


def compare_files(a: str, b: str) -> int:
    """`evaluate --compare A.json B.json`: two results side by side, if scored under one convention."""
    import json

    from .evaluate import compare_results
    from .files import read_utf8

    results = []
    for path in (a, b):
        try:
            results.append(json.loads(read_utf8(path)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not a JSON results file ({err.msg} at line {err.lineno})") from None
    print(compare_results(*results, names=(a, b)))
    return 0


def evaluate_checkpoint(args) -> int:
    """Generate --num-samples from a checkpoint (spread over torchrun's ranks) and score them on rank 0."""
    from .checkpoint import resolve_weights
    from .files import check_writable_folder
    from .images import save_npz
    from .sampling_run import SamplingRun

    folder = check_writable_folder(
        resolve_weights(args.checkpoint, not args.no_ema).parent,
        "the checkpoint's folder (evaluate writes its scores there)",
    )
    run = SamplingRun.open(
        args.checkpoint, use_ema=not args.no_ema, device=args.device, sparse_grid=args.sparse_grid, vae=args.vae
    )
    cfg, scfg = eval_config(args, run.config.eval), run.sample_config(**sample_settings(args))
    scored = run.score(cfg, scfg, data_root=args.data_root, progress=not args.no_progress)
    if scored is None:  # rank 0 scores the gathered samples
        return 0
    weights = "_raw" if args.no_ema else ""  # the EMA's and the raw weights' scores live side by side
    stem = f"eval_{setting_tag(scfg, args)}_n{cfg.num_samples}{weights}"
    if args.save_samples:
        save_npz(scored.images, scored.labels, folder / f"{stem}.npz")
    results = scored.results
    results["provenance"]["setting"].update(checkpoint=str(folder), ema=not args.no_ema)
    results["sample_seconds"] = scored.sample_seconds
    results["sample_gflops"] = run.sampling_gflops(scfg)  # model FLOPs per image
    print(
        f"sampling: {results['sample_gflops']:.3f} GFLOP/img (model FLOPs), "
        f"{1000 * scored.sample_seconds / cfg.num_samples:.1f} ms/img"
    )
    return write_results(results, folder / f"{stem}.json")


def write_results(results: dict, out: Path) -> int:
    import json

    from .evaluate import format_table
    from .files import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"written: {out}")
    return 0


def demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEMO_CONFIG, help=f"demo config (default {DEMO_CONFIG})")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo); an existing one is resumed")
    p.add_argument(
        "--per-class",
        type=int,
        default=10,
        help="samples per class shown in the grids (default 10); all eval.num_samples are scored",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def cmd_demo(args) -> int:
    from .config import load_config
    from .demo import run_demo, run_text_demo, run_video_demo

    if args.per_class < 1:
        raise UserError(f"--per-class must be >= 1, got {args.per_class}")
    cfg = load_config(args.config, args.overrides)
    if cfg.model.condition == "text":
        run_text_demo(cfg, Path(args.out), progress=not args.no_progress)
    elif cfg.data.name == "moving_fashion_mnist":
        run_video_demo(cfg, Path(args.out), progress=not args.no_progress)
    else:
        run_demo(cfg, Path(args.out), args.per_class, progress=not args.no_progress)
    return 0


def bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (default SiT-XL/2)")
    p.add_argument(
        "--model-from",
        help="time this run's architecture instead (e.g. a converted PixArt), at its input size, random weights",
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default 256)")
    p.add_argument(
        "--latent-factor", type=int, help="model input = resolution / factor (default 8, SD-VAE; 1: pixel space)"
    )
    p.add_argument("--channels", type=int, help="model input channels (default 4)")
    p.add_argument("--num-classes", type=int, help="classes (default 1000)")
    p.add_argument(
        "--frames", type=int, help="video: frames per clip, e.g. 16 (default 0: images; throughputs are then clips/s)"
    )
    p.add_argument("--patch-size-t", type=int, help="video: frames per token (default 1)")
    p.add_argument("--video-layout", help="video: joint (default) | factorised (Latte's space / time blocks)")
    p.add_argument("--batch", type=int, help="samples per training step and per guided half (default 64)")
    p.add_argument(
        "--mask-ratios", help="comma-separated token-drop ratios of the middle blocks (default 0,0.5,0.75,0.875)"
    )
    p.add_argument("--precision", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (static shapes)")
    p.add_argument(
        "--compile-mode",
        help="torch.compile mode with --compile: default | reduce-overhead (CUDA graphs) | max-autotune",
    )
    p.add_argument(
        "--grad-checkpointing", action="store_true", default=None, help="recompute block activations in backward"
    )
    p.add_argument("--sample-steps", type=int, help="steps of the timed PDG sampler run (default 25)")
    p.add_argument("--warmup", type=int, help="untimed repeats first (default 5)")
    p.add_argument("--repeats", type=int, help="timed repeats; the median is reported (default 20)")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: measured with a dense matmul)")
    p.add_argument(
        "--sparse-grids",
        help="also compare SparseDiT with these grid schedules, separated by spaces, e.g. '6:10 8 1=6,0.2=10'",
    )
    p.add_argument(
        "--sparse-layout",
        help="SparseDiT layout: Poolingformers,modules,sparse blocks,dense blocks per module (default: model.sparse's, "
        "2,4,3,1)",
    )
    p.add_argument(
        "--middle-keeps",
        help="also time sampling with SPRINT's middle thinned by these keep schedules, separated by spaces, e.g. "
        "'0.5 0.25 0.25:1'",
    )
    p.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument("--out", help="write the report as JSON here")


def cmd_bench(args) -> int:
    import json

    from .bench import BenchConfig, format_report, run_bench
    from .distributed import pick_device
    from .files import atomic_write_text, check_writable_file

    given = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    lists = {
        "mask_ratios": (float, ",", "numbers like 0,0.5,0.75"),
        "sparse_layout": (int, ",", "4 integers like 2,4,3,1"),
        "sparse_grids": (str, None, "schedules separated by spaces"),
        "middle_keeps": (str, None, "keep schedules separated by spaces"),
    }
    for key, (cast, sep, what) in lists.items():
        if key in given:
            try:
                given[key] = [cast(v) for v in given[key].split(sep)]
            except ValueError:
                raise UserError(f"--{key.replace('_', '-')} must be {what}, got {given[key]!r}") from None
    cfg = BenchConfig(**given)
    if args.out:
        check_writable_file(args.out, "--out")
    report = run_bench(cfg, pick_device(cfg.device))
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


def sparsify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="dense run folder, checkpoint folder or .safetensors file (fusion none)"
    )
    p.add_argument("--out", required=True, help="new checkpoint folder (config.yaml, model/ema.safetensors)")
    p.add_argument(
        "--sparse-grid",
        help="sparse grid schedule: constant 8, min:max (default 6:10, densest for the last quarter) or knots "
        "1=6,0.5=8,0.2=10",
    )
    p.add_argument("--pool-depth", type=int, help="Poolingformer blocks at the bottom (default 2)")
    p.add_argument("--modules", type=int, help="sparse-dense token modules (default 4)")
    p.add_argument("--sparse-depth", type=int, help="sparse blocks per module after its merge block (default 3)")
    p.add_argument("--dense-depth", type=int, help="dense blocks per module after its recover block (default 1)")
    p.add_argument(
        "--recover",
        help="fuse (default, the paper: W1 up(s) + W2 h, W1 = 0, W2 = I) | residual (h + up(the sparse blocks' "
        "change), starts near the dense model)",
    )
    p.add_argument("--no-ema", action="store_true", help="start from the raw weights instead of the EMA")


def cmd_sparsify(args) -> int:
    from .density import SparseConfig
    from .sparsify import sparsify

    keys = ("sparse_grid", "pool_depth", "modules", "sparse_depth", "dense_depth", "recover")
    layout = {
        k.removeprefix("sparse_") if k == "sparse_grid" else k: getattr(args, k)
        for k in keys
        if getattr(args, k) is not None
    }
    done = sparsify(args.checkpoint, args.out, SparseConfig(**layout), use_ema=not args.no_ema)
    grid = done.config.grid
    print(
        f"SparseDiT from {done.source}: grid {done.config.sparse.grid} on {'x'.join(map(str, grid))} tokens, "
        f"forward FLOPs {done.flops_ratio:.1%} of dense (average over t); wrote {done.folder}"
    )
    return 0


def adapt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="dense run folder, checkpoint folder or .safetensors (fusion none)"
    )
    p.add_argument("--out", required=True, help="new checkpoint folder (config.yaml, model/ema.safetensors)")
    p.add_argument("--encoder-depth", type=int, help="dense blocks before the token-sparse middle (default 2)")
    p.add_argument("--decoder-depth", type=int, help="dense blocks after the fusion (default 2)")
    p.add_argument("--path-drop", type=float, help="per-sample probability of dropping the sparse path (default 0.1)")
    p.add_argument("--no-ema", action="store_true", help="start from the raw weights instead of the EMA")


def cmd_adapt(args) -> int:
    from dataclasses import replace

    from .sections import SprintConfig
    from .sparsify import adapt

    given = {"encoder_depth": args.encoder_depth, "decoder_depth": args.decoder_depth, "path_drop_prob": args.path_drop}
    sprint = replace(SprintConfig(), **{k: v for k, v in given.items() if v is not None})
    folder = adapt(args.checkpoint, args.out, sprint, use_ema=not args.no_ema)
    print(
        f"SPRINT adapter on {args.checkpoint}: {sprint.encoder_depth} dense + middle + {sprint.decoder_depth} dense "
        f"blocks, fusion [I, 0] (the source's output at mask 0); fine-tune it with train.init_from={folder}"
    )
    return 0


def study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name",
        help="study file, or the name of one shipped in sprintdit/configs/studies/ (sprint-vs-dense, drop-ratio, "
        "drop-ratio-256, drop-ratio-steps, guidance, sparsedit, sparsedit-grid, sparsedit-64, tokens, "
        "sparse-inference, sparse-inference-256)",
    )
    p.add_argument(
        "--size", default="cpu", help="which size of the study: cpu (2 CPU cores) or gpu (one GPU); default cpu"
    )
    p.add_argument(
        "--out",
        help="study folder (default runs/studies/NAME-SIZE); an existing one is resumed, finished runs are skipped",
    )
    p.add_argument("--seeds", type=int, help="training seeds per run (default: the study's, 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_study(args) -> int:
    from .distributed import env_world
    from .study import run_study

    if env_world()[1] > 1:
        raise UserError("study runs its trainings one after another in one process; under torchrun use train")
    data = run_study(args.name, args.size, args.out, args.seeds, progress=not args.no_progress)
    for claim in data["claims"]:
        print(f"{claim['verdict']}: {claim['text']} ({claim['evidence']})")
    print(
        f"study {data['study']} ({data['size']}): {len(data['runs'])} runs finished in {data['wall_seconds'] / 60:.1f} "
        f"min; report: {Path(data['folder']) / 'results.md'}"
    )
    return 0


def plot_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (their metrics.jsonl)")
    p.add_argument(
        "--out", default=PLOT_NAME, help=f"PNG to write, or a folder to write {PLOT_NAME} into (default {PLOT_NAME})"
    )


def cmd_plot(args) -> int:
    from .files import check_writable_file
    from .plots import read_metrics, runs_chart

    out = Path(args.out) / PLOT_NAME if Path(args.out).is_dir() else Path(args.out)  # a folder: the chart goes into it
    check_writable_file(out, "--out")
    missing = [r for r in args.runs if not read_metrics(r)]
    if missing:
        raise UserError(
            f"no metrics.jsonl records in {', '.join(missing)} (give run folders written by sprintdit train)"
        )
    path = runs_chart([Path(r) for r in args.runs], out)
    print(f"wrote {path}")
    return 0


def convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="sprint: the SPRINT release; sit: willisma/SiT (linear path, velocity); dit: facebookresearch/DiT; "
        "diffusers: a DiTTransformer2DModel, PixArtTransformer2DModel or LatteTransformer3DModel folder; pixart: "
        "PixArt-alpha/Sigma's original .pth; latte: Vchitect/Latte's class-conditional or unconditional .pt",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help=".safetensors, or .pt/.pth read with weights_only: a state dict or a training dict (model, ema); "
        "diffusers: the model folder",
    )
    p.add_argument(
        "--out", required=True, help="new checkpoint folder: config.yaml, model.safetensors, ema.safetensors"
    )
    p.add_argument(
        "--input-size",
        help="model input N or H,W (latents: image side / 8); default from DiT/SiT pos_embed; required for sprint; "
        "Latte's text-to-video .pt: F,H,W (default 16,64,64, Latte-1's)",
    )
    p.add_argument(
        "--patch-size", type=int, help="sprint only (its patch embedding is a Linear): default 2, the release's"
    )
    p.add_argument(
        "--num-heads",
        type=int,
        help="attention heads when the weights cannot tell (no q_norm): default from --preset or the preset size of "
        "that width (e.g. 1152: 16)",
    )
    p.add_argument(
        "--preset", help="e.g. DiT-XL/2 or SiT-XL/2: the sizes are checked against the tensors and give the head count"
    )
    p.add_argument(
        "--caption-tokens", type=int, help="diffusers PixArt: T5 caption tokens (default 120, alpha's; Sigma: 300)"
    )
    p.add_argument(
        "--text-encoder-path",
        help="diffusers PixArt: the T5 folder; the empty prompt's embedding becomes the unconditional caption",
    )


def cmd_convert(args) -> int:
    from .convert import ConvertOptions, convert, describe, write_run
    from .files import check_new_folder

    size = parse_ints(args.input_size, "--input-size") if args.input_size else None
    if size is not None and len(size) not in (1, 2, 3):
        raise UserError(f"--input-size must be N, H,W or F,H,W (Latte's text-to-video .pt), got {args.input_size!r}")
    square = size is not None and len(size) == 1
    opts = ConvertOptions(
        args.source,
        size * 2 if square else size,
        args.patch_size,
        args.num_heads,
        args.preset,
        args.caption_tokens,
        args.text_encoder_path,
    )
    check_new_folder(args.out, "--out")
    converted = convert(Path(args.checkpoint), opts)
    for note in converted.notes:
        print(f"note: {note}")
    folder = write_run(Path(args.out), converted, args.source)
    print(f"converted {describe(converted, args.source)} from {args.checkpoint} -> {folder}")
    return 0


def export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder (latest checkpoint), checkpoint folder or .safetensors file"
    )
    p.add_argument("--out", required=True, help="new folder")
    p.add_argument(
        "--format",
        default="sprintdit",
        help="sprintdit (default: config.json, model.safetensors, README.md) | diffusers (DiTTransformer2DModel)",
    )
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")


def cmd_export(args) -> int:
    from .export import export

    folder = export(args.checkpoint, args.out, args.format, use_ema=not args.no_ema)
    print(
        f"exported {args.checkpoint} as {args.format} -> {folder} "
        f"({', '.join(sorted(p.name for p in folder.iterdir()))})"
    )
    return 0


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The sampling options `sample` and `evaluate` share; unset ones keep the checkpoint's `sample` section, and
    SampleConfig validates every value (the choices live there)."""
    g = p.add_argument_group("sampling (default: the checkpoint's sample section)")
    g.add_argument(
        "--sampler", help="flow: euler | heun | dopri5 (adaptive; --steps unused) | sde; ddpm objective: ddpm | ddim"
    )
    g.add_argument("--steps", type=int, help="sampling steps")
    g.add_argument(
        "--timestep-spacing",
        help="dpm-solver++: linspace (default, PixArt's) | leading | trailing, as diffusers names them",
    )
    g.add_argument("--guidance", help="none | cfg (classifier-free) | pdg (Path-Drop Guidance)")
    g.add_argument("--scale", type=float, help="guidance scale")
    g.add_argument("--interval", help="guide only for t in LOW,HIGH (t=1 is noise), e.g. 0,0.7")
    g.add_argument(
        "--middle-keep",
        help="SPRINT: share of the tokens the middle blocks see per step: 1 (all), 0.25, 0.25:1 (0.25 at pure noise, "
        "rising linearly to 1 at t=1/4) or knots t=keep,... (e.g. 1=0.25,0.5=0.5,0=1)",
    )
    g.add_argument("--middle-mask", help="thinned middle: varying (a fresh draw every step) | fixed (the same tokens)")
    g.add_argument("--middle-interval", help="thin the middle only for t in LOW,HIGH (t=1 is noise), e.g. 0.75,1")
    g.add_argument("--batch-size", type=int, help="samples per sampling batch")
    g.add_argument(
        "--sparse-grid",
        help="SparseDiT: sample with this density schedule instead of the checkpoint's (8, 6:10, 1=6,0.5=8,0.2=10)",
    )
    g.add_argument(
        "--vae", help="latent runs: the AutoencoderKL folder that decodes the samples (default: the run's data.vae)"
    )
    g.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


COMMANDS = (  # name, help, options, handler; `sprintdit --help` order
    (
        "prepare",
        "encode a class-per-folder image tree into sharded VAE latents (resumable; shards across torchrun ranks)",
        prepare_options,
        cmd_prepare,
    ),
    ("train", "train a run (all its stages); re-running on the same --out resumes exactly", train_options, cmd_train),
    ("sample", "sample images from a checkpoint: a PNG grid and an ADM-layout npz", sample_options, cmd_sample),
    (
        "evaluate",
        "FID, precision/recall, IS, class agreement (and sFID, FDD) of a checkpoint or a sample batch",
        evaluate_options,
        cmd_evaluate,
    ),
    (
        "bench",
        "training-step and sampling speed per mask ratio: ms, img/s, model FLOPs, TFLOP/s, MFU, memory",
        bench_options,
        cmd_bench,
    ),
    (
        "sparsify",
        "build a SparseDiT from a dense DiT/SiT checkpoint (fine-tune it with train.init_from)",
        sparsify_options,
        cmd_sparsify,
    ),
    (
        "adapt",
        "add SPRINT's sparse-dense fusion to a dense DiT/SiT/PixArt checkpoint, unchanged at init, for a token-sparse "
        "fine-tune",
        adapt_options,
        cmd_adapt,
    ),
    (
        "demo",
        "train SPRINT on Fashion-MNIST in both stages, then sample and score with PDG and CFG (--config "
        "fashion_mnist_text: the text-to-image demo; fashion_mnist_video: video)",
        demo_options,
        cmd_demo,
    ),
    (
        "study",
        "train and evaluate a named comparison of runs at one budget; writes results.md, results.json and plots "
        "(re-run to resume)",
        study_options,
        cmd_study,
    ),
    (
        "plot",
        "loss and FID against steps, training TFLOP and wall-clock for any runs, as one PNG",
        plot_options,
        cmd_plot,
    ),
    (
        "export",
        "write a checkpoint as a Hugging Face Hub-style folder (model card included) or a diffusers DiT folder",
        export_options,
        cmd_export,
    ),
    (
        "convert",
        "import a released SPRINT, SiT or DiT checkpoint as a run folder that sample and evaluate accept",
        convert_options,
        cmd_convert,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """Every command with the options its `*_options` function declares beside its handler. Defaults that a config
    dataclass holds are left unset here (None) and filled by it; nothing here imports torch, so `--help` stays fast."""
    parser = argparse.ArgumentParser(
        prog="sprintdit", description="Token-sparse diffusion transformers (SPRINT): train, sample, evaluate, demo."
    )
    parser.add_argument("--version", action="version", version=f"sprintdit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, options, handler in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        options(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may come before or after options
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        return args.func(args)
    except UserError as err:
        if not (
            isinstance(err, Stopped) and os.environ.get("RANK", "0") != "0"
        ):  # under torchrun rank 0 speaks for a stop
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (
        KeyboardInterrupt
    ):  # before training installs its own handling (start-up), or in a command that writes nothing partial
        print("error: interrupted; files are written atomically, nothing partial was left", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
