"""`sprintdit bench`: training-step and sampling speed of a preset, per mask ratio, with model FLOPs and MFU;
with sparse grids, SparseDiT's sampling speed and FLOPs against its dense source at the same settings.

Times are medians over `repeats` after `warmup` untimed repeats: CUDA events on a GPU, wall clock (after a
synchronize) elsewhere. FLOPs are analytic (`sprintdit.flops`); MFU divides achieved FLOP/s by a peak that
is measured here as the best dense matmul rate of the device in the benchmark's precision, unless given.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .checkpoint import read_config, resolve_weights
from .config import COMPILE_MODES
from .density import SparseConfig, parse_schedule, side_at
from .draws import Draws
from .errors import UserError
from .flops import GIGA, TERA, forward_flops
from .flops import sampling_flops as sampling_flops_of
from .masking import check_mask_ratio, make_mask
from .models import SiT, SparseDiT, resolve_model_config
from .models.sit import ModelConfig, SprintConfig
from .models.sparsedit import sparsify_state_dict
from .objective import FlowMatching, ObjectiveConfig
from .sampling import SampleConfig, euler, guided_output, time_grid
from .sections import check_sampling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_MATMUL_SIZE = 4096  # square matmul used to measure the device's peak (CPU: PEAK_MATMUL_SIZE_CPU)
PEAK_MATMUL_SIZE_CPU = 1024
PEAK_REPEATS = 10


@dataclass
class BenchConfig:
    preset: str = "SiT-XL/2"
    # time this run's architecture instead (e.g. a converted PixArt: captions, adaLN-single), at its own input size,
    # random weights, SPRINT's fusion added as the preset's; its captions are random T5-width rows of random lengths
    model_from: str | None = None
    resolution: int = 256  # image side in pixels
    latent_factor: int = 8  # the model sees resolution / latent_factor (SD-VAE: 8); 1 for pixel space
    channels: int = 4  # model input channels (SD-VAE latents: 4)
    frames: int = 0  # video: frames per clip (0: images); throughputs are then clips per second
    patch_size_t: int = 1  # video: frames per token
    video_layout: str = "joint"  # video: joint | factorised (Latte's; sin-cos positions)
    num_classes: int = 1000
    batch: int = 64
    mask_ratios: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.75, 0.875])
    encoder_depth: int = 2
    decoder_depth: int = 2
    precision: str = "auto"  # autocast dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    # torch.compile's mode: reduce-overhead captures CUDA graphs (small, launch-bound models)
    compile_mode: str = "default"
    grad_checkpointing: bool = False
    sample_steps: int = 25  # steps of the full sampler run
    warmup: int = 5
    repeats: int = 20
    peak_tflops: float | None = None  # measured when not given
    # SparseDiT schedules to compare with the dense model, e.g. ["6:10", "8"]
    sparse_grids: list[str] = field(default_factory=list)
    sparse_layout: list[int] = field(
        default_factory=lambda: [
            SparseConfig.pool_depth,
            SparseConfig.modules,
            SparseConfig.sparse_depth,
            SparseConfig.dense_depth,
        ]
    )  # Poolingformers, modules, sparse and dense blocks per module
    # SPRINT keep schedules of the middle blocks to time in sampling (sample.middle_keep), e.g. ["0.25", "0.25:1"]
    middle_keeps: list[str] = field(default_factory=list)
    device: str = "auto"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            sync(device)
            tic = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best observed rate of one square matmul (2 n^3 FLOPs) in `dtype`."""
    n = PEAK_MATMUL_SIZE if device.type == "cuda" else PEAK_MATMUL_SIZE_CPU
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, warmup=2, repeats=PEAK_REPEATS)
    return 2 * n**3 / seconds / TERA


def timed_network(mc: ModelConfig) -> SiT:
    """A random network of `mc`; a caption model's unconditional caption random too (all zero it would mask every
    token of the guidance's unconditional half)."""
    model = SiT(mc)
    if mc.condition == "text":
        torch.nn.init.normal_(model.y_embedder.empty)
    return model


def build_model(cfg: BenchConfig, device: torch.device) -> SiT:
    sprint = SprintConfig(encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth)
    if cfg.model_from is not None:
        source = read_config(resolve_weights(cfg.model_from)).model
        if source.condition == "text" and source.text.encoder == "learned":
            raise UserError(
                f"--model-from {cfg.model_from}: a learned-caption model; bench takes class or t5/clip ones"
            )
        mc = resolve_model_config(replace(source, arch="sit", sparse=SparseConfig(), sprint=sprint))
    else:
        side = cfg.resolution // cfg.latent_factor
        if side * cfg.latent_factor != cfg.resolution:
            raise UserError(f"--resolution {cfg.resolution} is not a multiple of the latent factor {cfg.latent_factor}")
        if cfg.frames < 0:
            raise UserError(f"--frames must be >= 1 for video or 0 for images, got {cfg.frames}")
        mc = ModelConfig(
            preset=cfg.preset,
            input_size=[cfg.frames] * bool(cfg.frames) + [side, side],
            patch_size_t=cfg.patch_size_t,
            video_layout=cfg.video_layout,
            **({"pos_embed": "sincos"} if cfg.video_layout == "factorised" else {}),
            in_channels=cfg.channels,
            num_classes=cfg.num_classes,
            sprint=sprint,
        )
    model = timed_network(mc).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model


def conditions(mc: ModelConfig, batch: int, g: torch.Generator) -> torch.Tensor:
    """Random conditions: class labels (B,), or caption embeddings (B, L, E), each zero after a random length."""
    if mc.condition == "class":
        return torch.randint(0, mc.num_classes, (batch,), generator=g)
    tokens = mc.text.max_tokens
    lengths = torch.randint(1, tokens + 1, (batch, 1), generator=g)  # (B, 1)
    emb = torch.randn(batch, tokens, mc.text.dim, generator=g)  # (B, L, E)
    return emb * (torch.arange(tokens)[None] < lengths)[..., None]


def run_bench(cfg: BenchConfig, device: torch.device) -> dict:
    """{"config", "device", "peak_tflops", "train": [per mask ratio], "sample": {...}}."""
    cfg = checked(cfg, device)
    model = build_model(cfg, device)
    for ratio in cfg.mask_ratios:
        check_mask_ratio(ratio, "structured", model.config.mask_grid()[0])
    dtype = DTYPES[cfg.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    peak = cfg.peak_tflops or measure_peak_tflops(device, dtype)
    report = {
        "config": asdict(cfg),
        "device": device_name(device),
        "torch": torch.__version__,
        "peak_tflops": peak,
        "train": bench_training(model, cfg, device, autocast, peak),
        "sample": bench_sampling(model, cfg, device, autocast),
    }
    if cfg.sparse_grids:
        report["sparsedit"] = bench_sparsedit(model, cfg, device, autocast)
    if cfg.middle_keeps:
        report["middle_keep"] = bench_middle_keep(model, cfg, device, autocast)
    return report


def checked(cfg: BenchConfig, device: torch.device) -> BenchConfig:
    """The config with precision auto resolved for `device`, every option checked."""
    if cfg.precision == "auto":
        cfg = replace(cfg, precision="bf16" if device.type == "cuda" else "fp32")
    if cfg.precision not in DTYPES:
        raise UserError(f"--precision {cfg.precision!r}: choose auto or one of {', '.join(DTYPES)}")
    if cfg.batch < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.sample_steps < 1:
        raise UserError("--batch, --repeats and --sample-steps must be >= 1, --warmup >= 0")
    for keep in cfg.middle_keeps:
        SampleConfig(middle_keep=keep)  # its checks; the grid's when the model is built
    if cfg.compile_mode not in COMPILE_MODES or (cfg.compile_mode != "default" and not cfg.compile):
        raise UserError(
            f"--compile-mode {cfg.compile_mode!r}: give it with --compile, one of {', '.join(COMPILE_MODES)}"
        )
    return cfg


def bench_training(model: SiT, cfg: BenchConfig, device: torch.device, autocast, peak: float) -> list[dict]:
    """Median training-step time, throughput, FLOPs, MFU and peak memory at each mask ratio."""
    mc = model.config
    objective = FlowMatching(ObjectiveConfig(), null_class=model.null_class)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model, mode=cfg.compile_mode, dynamic=False) if cfg.compile else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, mc.in_channels, *mc.input_size, generator=g).to(device)
    y = conditions(mc, cfg.batch, g).to(device)
    train = []
    for ratio in cfg.mask_ratios:
        grid, tiles = mc.mask_grid()
        mask = make_mask(cfg.batch, grid, ratio, "structured", g, tiles)
        mask = None if mask is None else mask.to(device)

        def step():
            with autocast:
                loss = objective.loss(forward, x, y, Draws(g), mask=mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(step, device, cfg.warmup, cfg.repeats)
        flops = 3 * forward_flops(mc, cfg.batch, ratio)
        train.append(
            {
                "mask_ratio": ratio,
                "step_ms": seconds * 1e3,
                "images_per_s": cfg.batch / seconds,
                "flops_per_step": flops,
                "tflops": flops / seconds / TERA,
                "mfu": flops / seconds / TERA / peak,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        )
    dense = next((r for r in train if r["mask_ratio"] == 0.0), None)
    for r in train:
        r["speedup_vs_dense"] = dense["step_ms"] / r["step_ms"] if dense else None
    return train


def velocity(model: SiT, y: torch.Tensor, guidance: str):
    """The guided prediction's first in_channels channels (a learned variance dropped), as the samplers step."""
    guided = guided_output(model, y, SampleConfig(guidance=guidance), model.config.in_channels)
    return lambda x, t: guided(x, t)[:, : model.config.in_channels]


@torch.no_grad()
def bench_sampling(model: SiT, cfg: BenchConfig, device: torch.device, autocast) -> dict:
    """Per-step time of one guided step (2B samples) with CFG and PDG, and images/s of a whole PDG run."""
    model.eval()
    mc = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, mc.in_channels, *mc.input_size, generator=g).to(device)
    y = conditions(mc, cfg.batch, g).to(device)
    out = {}
    for guidance in ("cfg", "pdg"):
        v = velocity(model, y, guidance)

        def guided_step():
            with autocast:
                v(x, 0.5)

        seconds = median_seconds(guided_step, device, cfg.warmup, cfg.repeats)
        rows = cfg.batch if guidance == "pdg" else None
        flops = forward_flops(mc, 2 * cfg.batch, middle_rows=rows)
        out[guidance] = {"step_ms": seconds * 1e3, "flops_per_step": flops}

    v = velocity(model, y, "pdg")

    def full_run():
        with autocast:
            euler(v, x, cfg.sample_steps)

    seconds = median_seconds(full_run, device, warmup=1, repeats=max(1, cfg.repeats // 5))
    out["pdg_speedup_vs_cfg"] = out["cfg"]["step_ms"] / out["pdg"]["step_ms"]
    out["pdg_images_per_s"] = cfg.batch / seconds
    out["pdg_sample_steps"] = cfg.sample_steps
    return out


@torch.no_grad()
def bench_middle_keep(model: SiT, cfg: BenchConfig, device: torch.device, autocast) -> list[dict]:
    """Images/s and FLOPs of whole Euler runs with CFG and with PDG, the middle blocks dense and then thinned by each
    keep schedule (one structured mask per step, as `sprintdit sample --middle-keep` draws them)."""
    mc = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(cfg.batch, mc.in_channels, *mc.input_size, generator=g).to(device)
    y = conditions(mc, cfg.batch, g).to(device)
    objective = FlowMatching(ObjectiveConfig(), null_class=model.null_class)
    rows = []
    for guidance in ("cfg", "pdg"):
        for keep in ["1", *cfg.middle_keeps]:
            scfg = SampleConfig(guidance=guidance, steps=cfg.sample_steps, middle_keep=keep)
            check_sampling(mc, "flow", scfg)
            guided = guided_output(model, y, scfg, mc.in_channels)

            def full_run():
                with autocast:
                    euler(lambda z, t: guided(z, t)[:, : mc.in_channels], x, cfg.sample_steps)

            seconds = median_seconds(full_run, device, warmup=1, repeats=max(1, cfg.repeats // 5))
            rows.append(
                {
                    "guidance": guidance,
                    "middle_keep": keep,
                    "images_per_s": cfg.batch / seconds,
                    "gflops_per_image": sampling_flops_of(model, objective, scfg) / GIGA,
                }
            )
    for r in rows:
        r["speedup_vs_dense_cfg"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["flops_vs_dense_cfg"] = r["gflops_per_image"] / rows[0]["gflops_per_image"]
    return rows


def sparsedit_configs(mc: ModelConfig, cfg: BenchConfig) -> tuple[ModelConfig, list[ModelConfig]]:
    """The dense source (the preset without SPRINT's fusion) and one SparseDiT per schedule."""
    if len(cfg.sparse_layout) != 4:
        raise UserError(
            f"--sparse-layout needs 4 numbers (Poolingformers, modules, sparse, dense), got {cfg.sparse_layout}"
        )
    dense = resolve_model_config(replace(mc, sprint=replace(mc.sprint, fusion="none", path_drop_prob=0.0)))
    layout = dict(zip(("pool_depth", "modules", "sparse_depth", "dense_depth"), cfg.sparse_layout))
    return dense, [
        resolve_model_config(replace(dense, arch="sparsedit", sparse=SparseConfig(grid=g, **layout)))
        for g in cfg.sparse_grids
    ]


def sampling_flops(mc: ModelConfig, batch: int, steps: int) -> int:
    """Model FLOPs of a CFG-guided Euler run (2 x batch per step), the grid following each step's t."""
    ts, n = time_grid(steps)[:-1], mc.frame_tokens
    if mc.arch != "sparsedit":
        return steps * forward_flops(mc, 2 * batch)
    schedule = parse_schedule(mc.sparse.grid)
    return sum(forward_flops(mc, 2 * batch, side=side_at(schedule, t, n)) for t in ts)


@torch.no_grad()
def bench_sparsedit(model: SiT, cfg: BenchConfig, device: torch.device, autocast) -> list[dict]:
    """Images/s and FLOPs of a CFG-guided Euler run: the dense model, then each SparseDiT built from it."""
    dense_cfg, sparse_cfgs = sparsedit_configs(model.config, cfg)
    dense = timed_network(dense_cfg).to(device).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(cfg.batch, dense_cfg.in_channels, *dense_cfg.input_size, generator=g).to(device)
    y = conditions(dense_cfg, cfg.batch, g).to(device)
    rows = []
    for mc in [dense_cfg, *sparse_cfgs]:
        net = dense
        if mc.arch == "sparsedit":
            net = SparseDiT(mc).to(device).eval()
            net.load_state_dict(sparsify_state_dict(dense.state_dict(), mc))
        v = velocity(net, y, "cfg")

        def full_run():
            with autocast:
                euler(v, x, cfg.sample_steps)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(full_run, device, warmup=1, repeats=max(1, cfg.repeats // 5))
        flops = sampling_flops(mc, cfg.batch, cfg.sample_steps)
        rows.append(
            {
                "grid": mc.sparse.grid if mc.arch == "sparsedit" else "dense",
                "images_per_s": cfg.batch / seconds,
                "gflops_per_image": flops / cfg.batch / GIGA,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        )
    for r in rows:
        r["speedup_vs_dense"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["flops_vs_dense"] = r["gflops_per_image"] / rows[0]["gflops_per_image"]
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_report(report: dict) -> str:
    c = report["config"]
    layout = c.get("video_layout", "joint")
    clips = f"{c['frames']}-frame clips ({layout}, frames per token {c['patch_size_t']}) " if c.get("frames") else ""
    mode = c.get("compile_mode", "default")
    compiled = (", compiled" + ("" if mode == "default" else f" ({mode})")) if c["compile"] else ""
    model = f"{c['preset']} on {clips}at {c['resolution']}px (model input {c['resolution'] // c['latent_factor']})"
    if c.get("model_from"):
        model = f"the architecture of {c['model_from']} (random weights, its own input size)"
    lines = [
        f"{model}, batch {c['batch']}, "
        f"{c['precision']}{compiled} on {report['device']}, torch {report['torch']}; "
        f"peak {report['peak_tflops']:.3g} TFLOP/s"
    ]
    lines.append(f"{'mask':>6}{'step ms':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs dense':>10}{'mem GiB':>9}")
    for r in report["train"]:
        speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"{r['mask_ratio']:>6g}{r['step_ms']:>10.1f}{r['images_per_s']:>10.1f}{r['tflops']:>10.2f}{r['mfu']:>8.1%}"
            f"{speed:>10}{mem:>9}"
        )
    s = report["sample"]
    lines.append(
        f"guided step (2 x {c['batch']}): CFG {s['cfg']['step_ms']:.1f} ms, PDG {s['pdg']['step_ms']:.1f} ms "
        f"({s['pdg_speedup_vs_cfg']:.2f}x); PDG sampler, {s['pdg_sample_steps']} steps: {s['pdg_images_per_s']:.1f} "
        f"img/s"
    )
    if "sparsedit" in report:
        lines.append(
            f"SparseDiT vs its dense source, CFG Euler {c['sample_steps']} steps, layout {c['sparse_layout']}:"
        )
        lines.append(f"{'grid':>8}{'img/s':>10}{'vs dense':>10}{'GFLOP/img':>11}{'FLOPs':>8}")
        for r in report["sparsedit"]:
            lines.append(
                f"{r['grid']:>8}{r['images_per_s']:>10.2f}{r['speedup_vs_dense']:>9.2f}x{r['gflops_per_image']:>11.3g}"
                f"{r['flops_vs_dense']:>8.1%}"
            )
    if "middle_keep" in report:
        lines.append(f"SPRINT's middle thinned while sampling, Euler {c['sample_steps']} steps (vs dense CFG):")
        lines.append(f"{'guidance':>9}{'keep':>10}{'img/s':>10}{'vs CFG':>9}{'GFLOP/img':>11}{'FLOPs':>8}")
        for r in report["middle_keep"]:
            lines.append(
                f"{r['guidance']:>9}{r['middle_keep']:>10}{r['images_per_s']:>10.2f}{r['speedup_vs_dense_cfg']:>8.2f}x"
                f"{r['gflops_per_image']:>11.3g}{r['flops_vs_dense_cfg']:>8.1%}"
            )
    return "\n".join(lines)
