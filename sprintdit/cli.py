"""Command line: `sprintdit train | sample | demo`. A thin layer over the library; user mistakes end in
one `error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = "fashion_mnist_sprint"


def find_config(name: str) -> Path:
    """A config path, or the name of a config shipped in configs/ (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise UserError(f"config {name} not found (neither a file nor a shipped config: {', '.join(names) or 'none'})")


def parse_ints(text: str, what: str) -> list[int]:
    """'0,3,5' or '0-9' (inclusive range) or a mix: '0-2,7'."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise UserError(f"{what} must be integers like 0,3,5 or 0-9, got {text!r}") from None
    return out


def cmd_train(args) -> int:
    from .config import load_config
    from .train import Trainer

    if args.config is None and args.out is None:
        raise UserError("give --config CONFIG to start a run, or --out RUN_DIR to resume one")
    cfg = load_config(find_config(args.config), args.overrides) if args.config else None
    if cfg is None and args.overrides:
        raise UserError("overrides need --config (a resumed run keeps its saved config)")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    trainer = Trainer(cfg, out, progress=not args.no_progress)
    start = trainer.step
    folder = trainer.fit(stop_at=args.stop_at)
    print(f"trained steps {start}..{trainer.step} in {out}; latest checkpoint: {folder}")
    print(f"metrics: {out / 'metrics.jsonl'}  samples: {out / 'samples'}")
    return 0


def sample_config(args, base):
    from .sampling import SampleConfig

    given = {k: getattr(args, k) for k in ("sampler", "steps", "guidance", "scale", "batch_size") if getattr(args, k) is not None}
    if args.interval is not None:
        try:
            given["interval"] = [float(v) for v in args.interval.split(",")]
        except ValueError:
            raise UserError(f"--interval must be LOW,HIGH, got {args.interval!r}") from None
    return SampleConfig(**{**vars(base), **given})


def cmd_sample(args) -> int:
    from .checkpoint import load_model
    from .images import save_grid, save_npz
    from .objective import FlowMatching
    from .sampling import generate
    from .train import pick_device

    device = pick_device(args.device)
    model, cfg = load_model(args.checkpoint, use_ema=not args.no_ema, device=device)
    scfg = sample_config(args, cfg.sample)
    if args.labels is not None:
        labels = parse_ints(args.labels, "--labels")
    else:
        labels = list(range(cfg.model.num_classes))
    if args.per_label < 1:
        raise UserError(f"--per-label must be >= 1, got {args.per_label}")
    labels = [y for y in labels for _ in range(args.per_label)]
    seeds = parse_ints(args.seeds, "--seeds") if args.seeds else list(range(args.seed_start, args.seed_start + len(labels)))
    objective = FlowMatching(cfg.objective, null_class=cfg.model.num_classes)
    tic = time.perf_counter()
    images = generate(model, objective, labels, seeds, scfg, device, progress=not args.no_progress)
    seconds = time.perf_counter() - tic
    out = Path(args.out)
    stem = f"{scfg.guidance}_{scfg.sampler}{scfg.steps}_s{scfg.scale:g}"
    grid = save_grid(images, out / f"{stem}.png", columns=args.per_label if args.per_label > 1 else min(len(labels), 10))
    npz = save_npz(images, labels, out / f"{stem}.npz")
    print(f"{len(labels)} samples in {seconds:.1f}s ({len(labels) / seconds:.2f} img/s) on {device}; grid: {grid}; batch: {npz}")
    return 0


def cmd_demo(args) -> int:
    import json

    from .config import load_config
    from .images import save_grid
    from .sampling import SampleConfig, generate
    from .train import Trainer

    if args.per_class < 1:
        raise UserError(f"--per-class must be >= 1, got {args.per_class}")
    cfg = load_config(find_config(args.config), args.overrides)
    out = Path(args.out)
    tic = time.perf_counter()
    trainer = Trainer(cfg, out, progress=not args.no_progress)
    print(f"demo: training {cfg.model.preset} on {cfg.data.name} ({', '.join(f'{s.name}: {s.steps} steps, mask {s.mask_ratio:g}' for s in cfg.stages)}) on {trainer.device}")
    folder = trainer.fit()
    train_s = time.perf_counter() - tic
    labels = [c for c in range(trainer.cfg.model.num_classes) for _ in range(args.per_class)]
    results = {"train_seconds": train_s}
    for guidance in ("pdg", "cfg"):
        scfg = SampleConfig(**{**vars(trainer.cfg.sample), "guidance": guidance})
        tic = time.perf_counter()
        images = generate(trainer.ema.eval(), trainer.objective, labels, list(range(len(labels))), scfg, trainer.device)
        results[f"{guidance}_sample_seconds"] = time.perf_counter() - tic
        results[f"{guidance}_grid"] = str(save_grid(images, out / f"demo_{guidance}.png", columns=args.per_class))
    (out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"demo done in {sum(v for k, v in results.items() if k.endswith('seconds')):.0f}s (training {train_s:.0f}s)")
    print(f"  samples, one row per class: {results['pdg_grid']} (PDG, {results['pdg_sample_seconds']:.1f}s), "
          f"{results['cfg_grid']} (CFG, {results['cfg_sample_seconds']:.1f}s)")
    print(f"  checkpoints: {folder.parent}  metrics: {out / 'metrics.jsonl'}  training grids: {out / 'samples'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprintdit", description="Token-sparse diffusion transformers (SPRINT): train, sample, demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (all its stages); re-running on the same --out resumes exactly")
    p.add_argument("--config", help="YAML config file, or the name of one in configs/ (e.g. fashion_mnist_sprint)")
    p.add_argument("--out", help="run folder (default runs/<config name>); an existing one is resumed")
    p.add_argument("--stop-at", type=int, help="stop after this global step (with a checkpoint); re-run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=32 stages.0.steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a checkpoint: a PNG grid and an ADM-layout npz")
    p.add_argument("--checkpoint", required=True, help="run folder (latest checkpoint), checkpoint folder or .safetensors file")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--labels", help="class labels, e.g. 0,3,5 or 0-9 (default: every class)")
    p.add_argument("--per-label", type=int, default=1, help="samples per label (default 1); the grid has one row per label")
    p.add_argument("--seeds", help="one seed per sample, e.g. 0-99 (default: consecutive from --seed-start)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    p.add_argument("--sampler", choices=("euler", "heun", "sde"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--guidance", choices=("none", "cfg", "pdg"), help="pdg: Path-Drop Guidance; cfg: classifier-free")
    p.add_argument("--scale", type=float, help="guidance scale (default: the run's sample.scale)")
    p.add_argument("--interval", help="guide only for t in LOW,HIGH (t=1 is noise), e.g. 0,0.7")
    p.add_argument("--batch-size", type=int, help="samples per forward batch")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="train SPRINT on Fashion-MNIST in both stages, then sample with PDG and CFG")
    p.add_argument("--config", default=DEMO_CONFIG, help=f"demo config (default {DEMO_CONFIG})")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo); an existing one is resumed")
    p.add_argument("--per-class", type=int, default=10, help="samples per class in the final grids (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_demo)
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
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
