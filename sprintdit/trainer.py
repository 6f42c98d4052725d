"""The training loop: one run = the config's stages in order (e.g. masked pre-training, full-token fine-tune).

Every random draw of a step (data order aside) comes from a generator on the training device seeded from
(train.seed, step) (sprintdit.draws), and the data order from (seed, epoch); the checkpoint holds the optimizer, scaler, step and
data position, so stopping and re-running the same command on the same run folder continues exactly as if it
had never stopped.

Under torchrun (see docs/distributed.md) every rank draws the random numbers of the whole global batch and
keeps its rows, and loads its rows of the same global data order, so W ranks train on exactly the samples
and noise one process would; DDP averages the gradients, FSDP2 shards parameters, gradients and optimizer
state. Only rank 0 writes; checkpoints hold full (unsharded) states and resume on any world size or strategy.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import checkpoint as ckpt
from .config import RunConfig, StageConfig, TrainConfig, reference_root, to_yaml
from .data import Batch, batches, build_dataset, posterior_sample
from .distributed import (
    Dist,
    any_over_ranks,
    barrier,
    check_divisible,
    collective,
    env_world,
    init_from_env,
    pick_device,
    mean_over_ranks,
    optimizer_state_by_index,
    optimizer_state_by_name,
    rank_rows,
)
from .errors import Diverged, Stopped, UserError
from .flops import train_flops
from .images import save_grid
from .density import gate_at, time_gates
from .draws import Draws
from .masking import check_mask_ratio
from .models import ModelConfig, build_model, resolve_model_config
from .models.sit import null_condition
from .objective import Distill, ObjectiveConfig, build_objective
from .runfolder import RunFolder
from .sampling import generate_on_ranks
from .stopping import StopNow, StopSignals
from .tracking import Tracker
from .vae import pixel_decoder

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_run_config(cfg: RunConfig, dataset) -> RunConfig:
    """Fill the model's data-dependent fields (and a latent run's VAE) from the dataset and check them and every stage's mask."""
    m, data = cfg.model, cfg.data
    if data.name == "latents" and data.vae is None:
        data = replace(data, vae=dataset.vae_path)
    from_data = {"input_size": list(dataset.resolution), "in_channels": dataset.channels, "num_classes": dataset.num_classes}
    features = getattr(dataset, "feature_shape", None)  # (T, D) REPA targets stored with the data
    if m.repa.depth:
        if features is None:
            raise UserError("model.repa.depth needs DINOv2 features stored with the data: run `sprintdit prepare` with --dinov2-weights, train on data.name=latents")
        if m.repa.dim is not None and m.repa.dim != features[1]:
            raise UserError(f"model.repa.dim is {m.repa.dim} but the data's features have {features[1]}; leave it unset to follow the data")
        m = replace(m, repa=replace(m.repa, dim=features[1]))
    m = text_from_data(m, dataset)
    for key, value in from_data.items():
        given = getattr(m, key)
        if given is not None and (list(given) if key == "input_size" else given) != value:
            raise UserError(f"model.{key} is {given} but the data has {value}; leave it unset to follow the data")
    m = resolve_model_config(replace(m, **{k: v for k, v in from_data.items() if getattr(m, k) is None}))
    if m.repa.depth and features[0] != m.num_tokens:
        raise UserError(f"the stored DINOv2 features have {features[0]} tokens but the model's token grid is {m.grid[0]}x{m.grid[1]}; prepare with --patch-size {m.patch_size}")
    for i, stage in enumerate(cfg.stages):
        if m.arch == "sparsedit" and stage.mask_ratio > 0:
            raise UserError(f"stages.{i} ({stage.name}): SparseDiT picks its tokens itself (model.sparse.grid); set mask_ratio 0")
        if stage.frames is not None and not (m.video and m.arch == "sit" and not m.repa.depth and 1 <= stage.frames <= m.input_size[0] and stage.frames % m.patch_size_t == 0):
            raise UserError(f"stages.{i} ({stage.name}): frames {stage.frames} trains a SiT video model (no REPA) on shorter clips: it needs a multiple of "
                            f"model.patch_size_t ({m.patch_size_t}) up to the clip's {m.input_size[0] if m.video else 'frames (this is an image model)'}")
        try:
            check_mask_ratio(stage.mask_ratio, stage.mask_type, m.at_frames(stage.frames).grid)
        except UserError as err:
            raise UserError(f"stages.{i} ({stage.name}): {err}") from None
    return replace(cfg, model=m, data=data)


def text_from_data(m: ModelConfig, dataset) -> ModelConfig:
    """model.text from captioned data (checked when given): the learned encoder's vocabulary and length, or a
    prepared table's encoder, folder, width and length. Class data needs condition class, and captions text."""
    vocabulary, table = getattr(dataset, "vocabulary", None), getattr(dataset, "caption_table", None)
    captioned = vocabulary is not None or table is not None
    if captioned != (m.condition == "text"):
        kind = "captions" if captioned else "class labels"
        raise UserError(f"the data has {kind} but model.condition is {m.condition!r}; set model.condition={'text' if captioned else 'class'}")
    if not captioned:
        return m
    tx = m.text
    if table is not None:
        if tx.encoder != table.encoder:
            raise UserError(f"the data holds {table.encoder} caption embeddings ({table.folder}); set model.text.encoder={table.encoder}")
        if tx.dim not in (None, table.dim):
            raise UserError(f"model.text.dim is {tx.dim} but the data's embeddings have {table.dim}; leave it unset to follow the data")
        return replace(m, text=replace(tx, dim=table.dim, max_tokens=table.max_tokens, path=tx.path or table.path))
    if tx.encoder != "learned":
        raise UserError(f"model.text.encoder {tx.encoder} reads embeddings prepared by `sprintdit prepare --captions`; this data has raw captions (use encoder learned)")
    if tx.vocabulary is not None and list(tx.vocabulary) != list(vocabulary):
        raise UserError(f"model.text.vocabulary differs from the data's {len(vocabulary)} words; leave it unset to follow the data")
    return replace(m, text=replace(tx, vocabulary=list(vocabulary), max_tokens=dataset.max_tokens))


def apply_init_from(cfg: RunConfig) -> RunConfig:
    """With train.init_from: the config with that checkpoint's model and objective."""
    if cfg.train.init_from is None:
        return cfg
    if cfg.model != ModelConfig() or cfg.objective != ObjectiveConfig():
        raise UserError("model and objective come from train.init_from: remove the model and objective sections (and overrides)")
    _, source = ckpt.load_weights(ckpt.resolve_weights(cfg.train.init_from, use_ema=True))
    return replace(cfg, model=source.model, objective=source.objective)


TEACHER_MUST_MATCH = {"model": ("input_size", "in_channels", "num_classes", "condition", "text"),
                      "objective": ("kind", "path", "num_timesteps", "beta_start", "beta_end")}


def load_teacher(cfg: RunConfig, device: torch.device) -> Distill | None:
    """train.distill_from's EMA network, frozen on `device`, when it sees the same inputs and predicts the same target as the run's model."""
    t = cfg.train
    if t.distill_from is None:
        return None
    teacher, source = ckpt.load_model(t.distill_from, use_ema=True, device=device)
    for section, keys in TEACHER_MUST_MATCH.items():
        for key in keys:
            mine, theirs = getattr(getattr(cfg, section), key), getattr(getattr(source, section), key)
            if mine != theirs:
                raise UserError(f"train.distill_from {t.distill_from}: the teacher's {section}.{key} is {theirs}, this run's {mine}; a teacher must see the same data and predict the same target")
    return Distill(teacher.requires_grad_(False), t.distill_weight)


EMA_WARMUP = 10  # train.ema_warmup: after n updates the decay is min(ema_decay, (1 + n) / (EMA_WARMUP + n))


def ema_decay_at(t: TrainConfig, updates: int) -> float:
    """The EMA decay of the update that follows `updates` earlier ones. With warm-up the average never reaches
    far back into a short run (at n updates it spans about the last n / EMA_WARMUP), and ema_decay caps it."""
    return min(t.ema_decay, (1 + updates) / (EMA_WARMUP + updates)) if t.ema_warmup else t.ema_decay


def ema_updates(cfg: RunConfig, step: int, skipped: list[int]) -> int:
    """The EMA updates before global step `step` (counted from 0) that its warm-up counts: those since the start of the
    latest stage with ema_restart (otherwise the run's), less the skipped non-finite steps (`skipped`, counted from 1)."""
    index, _ = stage_at(cfg.stages, step)
    origin = max([start for start, s in zip(stage_starts(cfg.stages), cfg.stages[: index + 1]) if s.ema_restart], default=0)
    return step - origin - sum(1 for k in skipped if k > origin)


def stage_starts(stages: list[StageConfig]) -> list[int]:
    """The global step each stage starts at."""
    return [sum(s.steps for s in stages[:i]) for i in range(len(stages))]


def stage_at(stages: list[StageConfig], step: int) -> tuple[int, int]:
    """(stage index, the step that stage starts at) for a global step; past the end: the last stage."""
    start = 0
    for i, s in enumerate(stages):
        if step < start + s.steps:
            return i, start
        start += s.steps
    return len(stages) - 1, start - stages[-1].steps


def stage_lr(stage: StageConfig, step_in_stage: int) -> float:
    """Linear warm-up from warmup_start * lr to lr over warmup_steps, then constant or a cosine decay that
    reaches 0 after the stage's last step."""
    if step_in_stage < stage.warmup_steps:
        frac = step_in_stage / stage.warmup_steps
        return stage.lr * (stage.warmup_start + (1 - stage.warmup_start) * frac)
    if stage.decay == "constant":
        return stage.lr
    frac = (step_in_stage - stage.warmup_steps) / (stage.steps - stage.warmup_steps)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * frac))


def total_steps(cfg: RunConfig) -> int:
    return sum(s.steps for s in cfg.stages)


class Due(NamedTuple):
    """What the loop does after a step, besides the step itself."""

    log: bool  # a metrics record
    grid: bool  # a sample grid
    evaluation: bool  # eval.num_samples scored
    checkpoint: bool


def due_after(cfg: RunConfig, step: int, end: int) -> Due:
    """What is due once global step `step` (counted from 1) of a run that ends at `end` is done. A log record every
    train.log_every steps, at each stage's end and after the first step (it shows the run works); a grid every
    train.sample_every and an evaluation every eval.every steps (0: never), both also at the end; a checkpoint every
    train.ckpt_every steps, at each stage's end (the next stage may change the batch) and at the end."""
    t = cfg.train
    index, start = stage_at(cfg.stages, step - 1)
    stage_end = step == start + cfg.stages[index].steps
    periodic = lambda every: every > 0 and (step % every == 0 or step == end)
    return Due(log=step % t.log_every == 0 or stage_end or step == 1, grid=periodic(t.sample_every),
               evaluation=periodic(cfg.eval.every), checkpoint=step % t.ckpt_every == 0 or stage_end or step == end)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each block and the root (embedders, fusion, final layer) become units of sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def full_state_options(cpu_offload: bool):
    """Options of torch.distributed.checkpoint.state_dict for full (unsharded) states; with cpu_offload only
    rank 0 receives them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


@dataclass
class Networks:
    """What one training process updates: the model, its EMA, the optimizer over the trainable parameters, and
    the callable a step runs forward (the model, DDP-wrapped and/or compiled)."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ddp: torch.nn.Module | None
    forward: Callable
    param_names: list[str]  # the optimizer's order: its saved state is keyed by index
    params: list[torch.nn.Parameter]
    ema_params: list[torch.nn.Parameter]


def build_networks(cfg: RunConfig, d: Dist, fsdp: bool, init_from: str | None = None, empty_text: torch.Tensor | None = None) -> Networks:
    """Model (initial weights from train.seed, the same on every rank, or the weights of `init_from`), EMA,
    FSDP2 or DDP wrapping, AdamW and the loss scaler, on d.device. `empty_text` (L, E): the data's embedding of
    the empty caption, which a model on precomputed caption embeddings keeps as its unconditional input."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(d.device)
    if empty_text is not None:
        model.y_embedder.empty.copy_(empty_text)
    model.grad_checkpointing = t.grad_checkpointing
    if init_from is not None:  # the EMA starts from them too
        source = ckpt.resolve_weights(init_from, use_ema=True)
        ckpt.load_state(model, ckpt.load_weights(source)[0], source)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if fsdp:  # the EMA is sharded like the model: each rank averages its own shards
        shard_model(model)
        shard_model(ema)
    trainable = [(n, p, e) for (n, p), e in zip(model.named_parameters(), ema.parameters()) if p.requires_grad]
    params = [p for _, p, _ in trainable]
    optimizer = torch.optim.AdamW(params, lr=cfg.stages[0].lr, betas=tuple(t.optim.betas), weight_decay=t.optim.weight_decay,
                                  eps=t.optim.eps, fused=d.device.type == "cuda")
    ddp = None
    if d.active and not fsdp:  # buffers are fixed and equal on every rank: no broadcast
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    wrapped = ddp or model
    forward = torch.compile(wrapped, mode=t.compile_mode, fullgraph=t.compile_fullgraph, dynamic=False) if t.compile else wrapped
    return Networks(model, ema, optimizer, torch.amp.GradScaler(d.device.type, enabled=t.precision == "fp16"), ddp, forward,
                    [n for n, _, _ in trainable], params, [e for _, _, e in trainable])


class Trainer:
    def __init__(self, cfg: RunConfig | None, run_dir: str | Path, progress: bool = True, dist: Dist | None = None):
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.path
        rank, world, _ = env_world() if dist is None else (dist.rank, dist.world_size, dist.local_rank)
        if cfg is None:  # resume: the run folder's saved config
            cfg = self.folder.check(None)[0]
            dataset = build_dataset(cfg.data)
        else:
            dataset = build_dataset(cfg.data)
            cfg = resolve_run_config(apply_init_from(cfg), dataset)
        t = cfg.train
        for i, stage in enumerate(cfg.stages):
            check_divisible(stage.batch_size or t.batch_size, world, t.grad_accum, f"stages.{i} ({stage.name})")
        self.folder.check(cfg)  # refused before anything is built; nothing is written before open_run
        self.cfg, self.dataset = cfg, dataset
        self.dist = dist or init_from_env(cfg.distributed, pick_device(t.device))
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        self.strategy = cfg.distributed.strategy
        self.fsdp = self.dist.active and self.strategy == "fsdp"
        if self.fsdp and t.precision == "fp16":
            raise UserError("train.precision fp16 is not supported with distributed.strategy fsdp (per-shard loss scaling); use bf16")
        fresh = not self.folder.checkpoints()  # a fresh run starts from train.init_from's weights, if given
        table = getattr(dataset, "caption_table", None)
        nets = build_networks(cfg, self.dist, self.fsdp, init_from=t.init_from if fresh else None, empty_text=None if table is None else table.empty)
        self.model, self.ema, self.ddp, self.forward = nets.model, nets.ema, nets.ddp, nets.forward
        self.optimizer, self.scaler = nets.optimizer, nets.scaler
        self.param_names, self.params, self.ema_params = nets.param_names, nets.params, nets.ema_params
        self.objective = build_objective(cfg.objective, null_condition(cfg.model), cfg.model.learn_sigma)
        self.distill = load_teacher(cfg, self.device)
        self.gates = time_gates(cfg.model.sparse.grid, cfg.model.frame_tokens, self.objective.time_cdf) if t.sparse_gating else None
        self.step, self.position = 0, 0
        self.nonfinite_steps: list[int] = []  # steps skipped for a non-finite loss or gradient norm (train.max_nonfinite_steps)
        self.train_seconds = 0.0  # wall-clock of the training steps so far (evaluation and sample grids excluded), kept across resumes
        self.evaluator = None  # built at the first evaluation (feature networks, reference statistics)
        self.stream, self.stream_stage = None, None  # the data stream and the stage it was made for (see next_batch)
        self.to_pixels = pixel_decoder(cfg.data, self.device)  # latents -> images for grids and evaluation
        self.config_yaml = to_yaml(cfg)
        self.tracker = None  # while fitting (rank 0): the optional loggers
        self.open_run()

    def summary(self) -> str:
        """What is about to run, in three lines (the CLI prints it at start-up)."""
        cfg, t, m = self.cfg, self.cfg.train, self.cfg.model
        params = sum(p.numel() for p in self.model.parameters())
        stages = " -> ".join(f"{s.name} {s.steps} steps (mask {s.mask_ratio:g}{' ' + s.mask_type if s.mask_ratio else ''}, lr {s.lr:g}, "
                             f"batch {s.batch_size or t.batch_size})" for s in cfg.stages)
        where = f"{self.dist.world_size} ranks ({self.strategy})" if self.dist.active else "1 process"
        latest = self.folder.checkpoints()
        start = f"resuming from step {self.step} of {total_steps(cfg)} ({latest[-1]})" if self.step else f"starting at step 0 of {total_steps(cfg)}"
        if self.distill is not None:
            stages += f"; target {t.distill_weight:g} x the teacher's ({t.distill_from})"
        return (f"{m.preset or 'model'} (arch {m.arch}, fusion {m.sprint.fusion}, {'x'.join(map(str, m.grid))} tokens): {params / 1e6:.2f}M parameters on "
                f"{self.device} x {where}, {t.precision}, compile {'on' if t.compile else 'off'}, grad accumulation {t.grad_accum}\n"
                f"stages: {stages}\n{start}; run folder {self.run_dir}")

    # ------------------------------------------------------------------ the run folder

    def open_run(self) -> None:
        """Take the run folder (rank 0: its lock, config.yaml, stale temporary files) and resume its latest checkpoint."""
        try:
            if self.dist.is_main:
                self.folder.take(self.cfg)
            latest = self.folder.checkpoints()
            if latest:
                self.load(latest[-1])
            if self.dist.is_main:
                self.folder.trim(self.step)
        except BaseException:
            self.folder.release()
            raise

    # ------------------------------------------------------------------ state

    def train_state(self, optimizer_state: dict) -> dict:
        return {
            "step": self.step,
            "position": self.position,
            "nonfinite_steps": self.nonfinite_steps,
            "train_seconds": self.train_seconds,
            "world_size": self.dist.world_size,
            "strategy": self.strategy,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def full_states(self) -> tuple[dict, dict, dict]:
        """(model, EMA, optimizer) states, full and on the CPU of rank 0 (FSDP: gathered from every rank's shards;
        other ranks get empty dicts). The optimizer state is index-keyed as torch's own, for any strategy."""
        if not self.fsdp:
            return self.model.state_dict(), self.ema.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = full_state_options(cpu_offload=True)
        with collective(self.dist, f"gathering the sharded state of checkpoint step {self.step}"):
            model, ema = get_model_state_dict(self.model, options=opts), get_model_state_dict(self.ema, options=opts)
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return model, ema, optimizer_state_by_index(optim, self.param_names) if self.dist.is_main else {}

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (atomically) once every rank's part is gathered; the others wait."""
        model, ema, optim = self.full_states()
        if self.dist.is_main:
            state = self.train_state(optim)
            ckpt.save_checkpoint(self.run_dir, self.step, model, ema, state, self.config_yaml, self.cfg.train.keep_last)
        barrier(self.dist, f"waiting for rank 0 to write checkpoint step {self.step}")
        return ckpt.step_dir(self.run_dir, self.step)

    def load(self, folder: Path) -> None:
        """Every rank reads the full checkpoint (any world size, any strategy) and keeps what it holds."""
        weights = [ckpt.load_weights(folder / name)[0] for name in ("model.safetensors", "ema.safetensors")]
        state = ckpt.load_train_state(folder / "state.pt")
        ckpt.check_step(folder, int(folder.name.removeprefix("step_")), state["step"], "its training state records")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            opts = full_state_options(cpu_offload=False)
            with collective(self.dist, f"loading checkpoint {folder.name} into the shards"):
                set_model_state_dict(self.model, weights[0], options=opts)
                set_model_state_dict(self.ema, weights[1], options=opts)
                named = optimizer_state_by_name(state["optimizer"], self.param_names)
                set_optimizer_state_dict(self.model, self.optimizer, named, options=opts)
        else:
            ckpt.load_state(self.model, weights[0], folder / "model.safetensors")
            ckpt.load_state(self.ema, weights[1], folder / "ema.safetensors")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.position = state["step"], state["position"]
        self.nonfinite_steps = list(state.get("nonfinite_steps", []))
        self.train_seconds = state.get("train_seconds", 0.0)  # absent in checkpoints written before it was kept
        saved = (state.get("world_size", 1), state.get("strategy", "ddp"))
        if saved != (self.dist.world_size, self.strategy) and self.dist.is_main:
            print(self.world_change_note(*saved), file=sys.stderr)

    def world_change_note(self, world: int, strategy: str) -> str:
        t = self.cfg.train
        batch = self.cfg.stages[stage_at(self.cfg.stages, self.step)[0]].batch_size or t.batch_size
        return (
            f"resuming step {self.step} saved on {world} rank(s) ({strategy}) on {self.dist.world_size} ({self.strategy}): "
            f"the global batch ({batch}), data order and random draws are unchanged; the per-rank micro-batch is "
            f"{batch // (self.dist.world_size * t.grad_accum)} (was {batch // (world * t.grad_accum)}); results match an "
            f"uninterrupted run up to float summation order"
        )

    # ------------------------------------------------------------------ steps

    def grad_sync(self, last: bool):
        """Gradients are averaged over ranks after the last micro-batch only (no_sync / FSDP2's gradient sync flag)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.cfg.train.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self, batch: Batch, stage: StageConfig) -> torch.Tensor:
        """Forward and backward over `grad_accum` micro-batches (gradients summed); returns this rank's mean loss.

        The batch holds this rank's rows (its block of each micro-batch); every random draw (sliced by `Draws`)
        is made for the global batch or micro-batch, so the ranks together compute exactly one process's step."""
        t, m = self.cfg.train, self.cfg.model
        draws = Draws.for_step(t.seed, self.step, self.dist.shard, self.device)  # drawn on the device: no copies
        batch = batch.to(self.device)
        total = torch.zeros((), device=self.device)
        x = posterior_sample(batch, draws)  # latents: a fresh posterior sample
        if stage.frames is not None:  # a shorter-clip stage: each clip's first frames
            x = x[:, :, : stage.frames]  # (B, C, frames, H, W)
        grid = m.at_frames(stage.frames).grid
        features = batch.features.chunk(t.grad_accum) if m.repa.depth else [None] * t.grad_accum
        for i, (xm, ym, fm) in enumerate(zip(x.chunk(t.grad_accum), batch.y.chunk(t.grad_accum), features)):
            b = xm.shape[0]  # this rank's rows of the micro-batch
            mask = draws.mask(b, grid, stage.mask_ratio, stage.mask_type)
            path_drop = draws.rand(b) < m.sprint.path_drop_prob if m.sprint.path_drop_prob > 0 else None
            gate = {} if self.gates is None else self.gated(i)  # SparseDiT: t from one stratum, one grid for the micro-batch
            with self.grad_sync(last=i == t.grad_accum - 1):
                with self.autocast():
                    loss = self.objective.loss(self.forward, xm, ym, draws, mask=mask, path_drop=path_drop, features=fm, distill=self.distill, **gate)
                self.scaler.scale(loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        return total

    def gated(self, index: int) -> dict:
        """The objective's and the model's arguments for micro-batch `index` of this step under train.sparse_gating."""
        gate = gate_at(self.gates, self.step * self.cfg.train.grad_accum + index)
        return {"t_cdf": (gate.lo, gate.hi), "side": gate.side}

    def update(self, loss: torch.Tensor, stop_requested: bool) -> tuple[torch.Tensor, bool, bool]:
        """Unscale, clip, then (unless the loss or gradient norm is not finite on some rank) optimizer step and EMA.

        Returns (gradient norm before clipping, whether the step was skipped as non-finite, whether any rank asks
        to stop). Both decisions come from one flag tensor: a single host sync per step, and under torchrun one
        small all-reduce, so every rank skips, stops and saves at the same step."""
        t = self.cfg.train
        self.scaler.unscale_(self.optimizer)
        max_norm = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # FSDP: a DTensor, the norm over all shards
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        nonfinite = ~torch.isfinite(loss)
        if not self.scaler.is_enabled():  # fp16: the scaler itself skips steps with inf/NaN gradients and lowers its scale
            nonfinite = nonfinite | ~torch.isfinite(grad_norm)
        flags = torch.stack([nonfinite, torch.tensor(stop_requested, device=self.device)])
        skip, stop = any_over_ranks(self.dist, flags, f"checking step {self.step + 1} for non-finite values and stop requests")
        if not skip:
            self.scaler.step(self.optimizer)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 1.0 - ema_decay_at(t, ema_updates(self.cfg, self.step, self.nonfinite_steps)))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skip, stop

    def nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor, index: int, last: Path | None) -> None:
        """Record a skipped non-finite step (train.max_nonfinite_steps of them), or stop the run (nothing is saved)."""
        t, stage = self.cfg.train, self.cfg.stages[index]
        self.nonfinite_steps.append(self.step + 1)
        what = f"step {self.step + 1} ({stage.name}): loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}"
        self.log({"step": self.step + 1, "event": "nonfinite", "loss": float(loss), "grad_norm": float(grad_norm)})
        if len(self.nonfinite_steps) <= t.max_nonfinite_steps:
            if self.dist.is_main:
                print(f"warning: skipped {what} ({len(self.nonfinite_steps)} of train.max_nonfinite_steps {t.max_nonfinite_steps})", file=sys.stderr)
            return
        kept = f"the last checkpoint {last} stands" if last else "no checkpoint was written"
        raise Diverged(f"training diverged at {what}; nothing was saved, {kept}; lower stages.{index}.lr or raise train.max_nonfinite_steps")

    def sampling_model(self) -> torch.nn.Module:
        """The EMA as a plain module on every rank (FSDP: its shards gathered into a full copy)."""
        if not self.fsdp:
            return self.ema
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        with collective(self.dist, "gathering the EMA weights for sampling"):
            full = get_model_state_dict(self.ema, options=full_state_options(cpu_offload=False))
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
            model = build_model(self.cfg.model).to(self.device)
        model.load_state_dict(full)
        return model.eval()

    def sample_grid(self) -> Path:
        """EMA samples, one row per class (classes spread evenly when there are more rows than fit); the
        sampling batches are spread over the ranks, rank 0 writes the grid."""
        t, classes = self.cfg.train, self.cfg.model.num_classes
        if self.cfg.model.condition == "text":  # one row per caption of the first training items
            rows = self.dataset.load(torch.arange(min(t.grid_rows, len(self.dataset))))[1].tolist()
        else:
            rows = torch.linspace(0, classes - 1, min(classes, t.grid_rows)).round().long().tolist()
        labels = [c for c in rows for _ in range(t.grid_columns)]
        images = generate_on_ranks(self.sampling_model(), self.objective, labels, list(range(len(labels))), self.cfg.sample, self.dist)
        path = self.folder.grid_path(self.step)
        if self.dist.is_main:
            save_grid(self.to_pixels(images), path, columns=t.grid_columns)
            if self.tracker is not None:
                self.tracker.image("samples", path, self.step)
        return path

    def evaluate(self) -> dict:
        """Metrics of eval.num_samples EMA samples (the `sample` settings), logged with the step, training FLOPs and
        seconds. Every rank samples its share; rank 0 scores them (the others get an empty record)."""
        from .evaluate import flatten, generate_and_score

        cfg = self.cfg
        tic = time.perf_counter()
        scored = generate_and_score(self.sampling_model(), self.objective, cfg.eval, cfg.sample, self.dist, self.to_pixels, self.evaluator, reference_root(cfg.data))
        if scored is None:
            return {}
        self.evaluator = scored.evaluator
        record = {
            "step": self.step, "train_flops": train_flops(cfg, self.step), "train_seconds": self.train_seconds,
            "eval_samples": len(scored.labels), **flatten(scored.results),
            "sample_seconds": scored.sample_seconds, "eval_seconds": time.perf_counter() - tic,
        }
        self.log(record)
        return record

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            record = self.folder.log(record)
            if self.tracker is not None:
                self.tracker.scalars(record)

    def grids_and_evaluation(self, due: Due, stops: StopSignals, missing_only: bool = False) -> bool:
        """The sample grid and evaluation `due` at this step (with `missing_only`, those a stop at this step skipped);
        a stop signal aborts them at once in a single process. Returns whether to stop."""
        grid = due.grid and not (missing_only and self.folder.grid_path(self.step).is_file())
        scored = due.evaluation and not (missing_only and self.folder.has_evaluation(self.step))
        if missing_only:  # rank 0 (which writes) decides for all
            mine = torch.tensor([grid, scored]) if self.dist.is_main else torch.zeros(2)
            grid, scored = any_over_ranks(self.dist, mine, "agreeing on the evaluations to catch up")
        try:
            with stops.abortable(allowed=not self.dist.active):  # ranks must not leave a collective early
                if grid:
                    self.sample_grid()
                if scored:
                    self.evaluate()
        except StopNow:
            return True
        finally:
            self.model.train()
        return False

    def fit(self, stop_at: int | None = None) -> Path:
        """Run the remaining steps (up to global step `stop_at`, if given); returns the last checkpoint folder.

        A stop signal (see sprintdit.stopping) ends the run after the current step with a checkpoint and raises
        Stopped; a non-finite step beyond train.max_nonfinite_steps raises Diverged and writes nothing."""
        end = total_steps(self.cfg) if stop_at is None else min(stop_at, total_steps(self.cfg))
        if self.dist.is_main:
            self.folder.hold()
        try:
            if self.dist.is_main:
                self.tracker = Tracker(self.cfg.train.loggers, self.run_dir, asdict(self.cfg), self.step)
            with StopSignals(quiet=not self.dist.is_main) as stops:
                last = self.folder.checkpoints()
                if self.step >= end:
                    return last[-1] if last else self.save()
                self.build_graphs(end)
                return self.run_steps(end, stops, last[-1] if last else None)
        finally:
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None
            self.folder.release()

    def build_graphs(self, end: int) -> None:
        """With train.compile: one forward and backward of every remaining stage's shapes (its micro-batch, frames and
        kept tokens) before the first step, its gradients discarded, so every stage's compiled graph exists before the
        training budget starts and no stage switch compiles mid-run (static shapes: a stage's graph never recompiles).
        The warm-up reads the data from position 0 and the draws of the current step, moves no stream, generator,
        optimizer, scaler or EMA, and is logged with its seconds."""
        t = self.cfg.train
        if not t.compile:
            return
        tic = time.perf_counter()
        built = set()
        for index in range(stage_at(self.cfg.stages, self.step)[0], stage_at(self.cfg.stages, end - 1)[0] + 1):
            stage = self.cfg.stages[index]
            batch = stage.batch_size or t.batch_size
            shapes = (batch, stage.frames, stage.mask_ratio, stage.mask_type if stage.mask_ratio else None)
            if shapes in built:
                continue
            rows = rank_rows(batch, t.grad_accum, self.dist.shard) if self.dist.active else None
            with collective(self.dist, f"building the compiled graphs of stage {stage.name}"):
                self.train_step(next(batches(self.dataset, batch, t.seed, 0, 0, rows)), stage)
            self.optimizer.zero_grad(set_to_none=True)
            built.add(shapes)
        self.log({"step": self.step, "event": "graphs_built", "stages": len(built), "seconds": time.perf_counter() - tic})

    def run_steps(self, end: int, stops: StopSignals, last: Path | None) -> Path:
        """The training loop: one optimizer step per iteration, then what is due after it (`due_after`: a log record,
        a sample grid, an evaluation, a checkpoint). `last` is the newest checkpoint; the return value too."""
        from tqdm import tqdm

        interval = 0.5 if sys.stderr.isatty() else 30.0  # keep redirected logs (e.g. SLURM) short
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True, mininterval=interval)
        meter = StepMeter(self.device, self.step)
        self.stream_stage = None  # a fresh data stream from the saved position
        # a run stopped right after a step skips that step's grid and evaluation: do them first
        stop = self.step > 0 and self.grids_and_evaluation(due_after(self.cfg, self.step, end), stops, missing_only=True)
        try:
            while self.step < end and not stop:
                began = time.perf_counter()
                index, stage, lr = self.begin_step()
                with collective(self.dist, f"training step {self.step + 1} (gradient all-reduce)"):
                    loss = self.train_step(self.next_batch(index), stage)  # forward and backward of every micro-batch
                    grad_norm, skipped, stop = self.update(loss, stops.signum is not None)  # one host sync per step
                if skipped:
                    self.nonfinite(loss, grad_norm, index, last)  # past train.max_nonfinite_steps: Diverged, nothing saved
                self.step += 1
                self.position += stage.batch_size or self.cfg.train.batch_size
                self.train_seconds += time.perf_counter() - began
                meter.add(None if skipped else loss)
                bar.update(1)
                due = due_after(self.cfg, self.step, end)
                if due.log:
                    self.log_progress(meter, stage, lr, grad_norm, bar)
                stop = stop or (not self.dist.active and stops.signum is not None)  # one process need not wait for agreement
                with meter.paused():  # the step rate counts training time only
                    stop = stop or self.grids_and_evaluation(due, stops)
                if stop or due.checkpoint:
                    with stops.saving():
                        last = self.save()
                    stop = stop or (not self.dist.active and stops.signum is not None)  # a signal during that save: no further step
        finally:
            bar.close()
        if stop and self.step < end:
            raise Stopped(f"{stops.name or 'stop requested on another rank'} at step {self.step}: saved {last}; run the same command to resume", stops.signum or signal.SIGTERM)
        return last

    def begin_step(self) -> tuple[int, StageConfig, float]:
        """(stage index, stage, learning rate) of the next step, the rate set on the optimizer."""
        index, start = stage_at(self.cfg.stages, self.step)
        stage = self.cfg.stages[index]
        lr = stage_lr(stage, self.step - start)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return index, stage, lr

    def next_batch(self, index: int) -> Batch:
        """The next batch of stage `index` from the saved data position (a new stream when the stage, and so
        possibly the batch size, changes); under torchrun this rank's rows of the global batch."""
        if self.stream_stage != index:
            t = self.cfg.train
            batch = self.cfg.stages[index].batch_size or t.batch_size
            rows = rank_rows(batch, t.grad_accum, self.dist.shard) if self.dist.active else None
            self.stream = batches(self.dataset, batch, t.seed, self.position, self.cfg.data.num_workers, rows, pin=self.device.type == "cuda")
            self.stream_stage = index
        return next(self.stream)

    def log_progress(self, meter: "StepMeter", stage: StageConfig, lr: float, grad_norm: torch.Tensor, bar) -> None:
        """One metrics record: the mean loss since the last one (over ranks), rates and the run's FLOPs and seconds."""
        if not meter.count:  # every step since the last record was skipped as non-finite
            return
        rate, batch = meter.rate(self.step), stage.batch_size or self.cfg.train.batch_size
        record = {
            "step": self.step, "stage": stage.name, "loss": meter.mean_loss(self.dist), "lr": lr,
            "grad_norm": float(grad_norm), "steps_per_s": rate, "images_per_s": rate * batch,
            "mask_ratio": stage.mask_ratio, "train_flops": train_flops(self.cfg, self.step), "train_seconds": self.train_seconds,
        }
        self.log(record)
        bar.set_postfix(stage=stage.name, loss=f"{record['loss']:.4f}", img_s=f"{rate * batch:.0f}")
        meter.reset(self.step)


class StepMeter:
    """The losses and training time since the last log record; losses stay on the device (no sync per step)."""

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss_sum, self.count = torch.zeros((), device=self.device), 0
        self.tick, self.tick_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.loss_sum, self.count = self.loss_sum + loss.float(), self.count + 1

    def mean_loss(self, d: Dist) -> float:
        return mean_over_ranks(d, self.loss_sum).item() / self.count

    def rate(self, step: int) -> float:
        return (step - self.tick_step) / (time.perf_counter() - self.tick)

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.tick += time.perf_counter() - began
