"""The training loop: one run = the config's stages in order (e.g. masked pre-training, full-token fine-tune).

Every random draw of a step (data order aside) comes from one CPU generator whose state is checkpointed
with the optimizer, scaler, step and data position, so stopping and re-running the same command on the
same run folder continues exactly as if it had never stopped.

Under torchrun (see docs/distributed.md) every rank draws the random numbers of the whole global batch and
keeps its rows, and loads its rows of the same global data order, so W ranks train on exactly the samples
and noise one process would; DDP averages the gradients, FSDP2 shards parameters, gradients and optimizer
state. Only rank 0 writes; checkpoints hold full (unsharded) states and resume on any world size or strategy.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig, StageConfig, TrainConfig, from_yaml_text, to_yaml
from .data import Batch, batches, build_dataset, posterior_sample
from .distributed import (
    Dist,
    barrier,
    check_divisible,
    collective,
    env_world,
    init_from_env,
    mean_over_ranks,
    optimizer_state_by_index,
    optimizer_state_by_name,
    rank_rows,
    shard_rows,
)
from .errors import UserError
from .flops import train_flops
from .images import save_grid
from .masking import check_mask_ratio, make_mask
from .models import ModelConfig, build_model, resolve_model_config
from .objective import ObjectiveConfig, build_objective
from .sampling import DDPM_SAMPLERS, generate_on_ranks
from .vae import pixel_decoder

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def resolve_run_config(cfg: RunConfig, dataset) -> RunConfig:
    """Fill the model's data-dependent fields (and a latent run's VAE) from the dataset and check them and every stage's mask."""
    m, data = cfg.model, cfg.data
    if data.name == "latents" and data.vae is None:
        data = replace(data, vae=dataset.vae_path)
    from_data = {"input_size": list(dataset.resolution), "in_channels": dataset.channels, "num_classes": dataset.num_classes}
    features = getattr(dataset, "feature_shape", None)  # (T, D) REPA targets stored with the data
    if m.repa_depth:
        if features is None:
            raise UserError("model.repa_depth needs DINOv2 features stored with the data: run `sprintdit prepare` with --dinov2-weights, train on data.name=latents")
        from_data["repa_dim"] = features[1]
    for key, value in from_data.items():
        given = getattr(m, key)
        if given is not None and (list(given) if key == "input_size" else given) != value:
            raise UserError(f"model.{key} is {given} but the data has {value}; leave it unset to follow the data")
    m = resolve_model_config(replace(m, **{k: v for k, v in from_data.items() if getattr(m, k) is None}))
    if m.repa_depth and features[0] != m.grid[0] * m.grid[1]:
        raise UserError(f"the stored DINOv2 features have {features[0]} tokens but the model's token grid is {m.grid[0]}x{m.grid[1]}; prepare with --patch-size {m.patch_size}")
    if m.fusion == "none" and cfg.sample.guidance == "pdg":
        raise UserError("sample.guidance 'pdg' needs model.fusion 'concat_linear'; use sample.guidance=cfg for fusion 'none'")
    if (cfg.sample.sampler in DDPM_SAMPLERS) != (cfg.objective.kind == "ddpm"):
        raise UserError(f"sample.sampler {cfg.sample.sampler!r} does not fit objective.kind {cfg.objective.kind!r} (ddpm: ddpm | ddim; flow: euler | heun | sde)")
    for i, stage in enumerate(cfg.stages):
        if m.arch == "sparsedit" and stage.mask_ratio > 0:
            raise UserError(f"stages.{i} ({stage.name}): SparseDiT picks its tokens itself (model.sparse.grid); set mask_ratio 0")
        try:
            check_mask_ratio(stage.mask_ratio, stage.mask_type, m.grid)
        except UserError as err:
            raise UserError(f"stages.{i} ({stage.name}): {err}") from None
    return replace(cfg, model=m, data=data)


def apply_init_from(cfg: RunConfig) -> RunConfig:
    """With train.init_from: the config with that checkpoint's model and objective."""
    if cfg.train.init_from is None:
        return cfg
    if cfg.model != ModelConfig() or cfg.objective != ObjectiveConfig():
        raise UserError("model and objective come from train.init_from: remove the model and objective sections (and overrides)")
    _, source = ckpt.load_weights(ckpt.resolve_weights(cfg.train.init_from, use_ema=True))
    return replace(cfg, model=source.model, objective=source.objective)


EMA_WARMUP = 10  # train.ema_warmup: after n updates the decay is min(ema_decay, (1 + n) / (EMA_WARMUP + n))


def ema_decay_at(t: TrainConfig, updates: int) -> float:
    """The EMA decay of the update that follows `updates` earlier ones. With warm-up the average never reaches
    far back into a short run (at n updates it spans about the last n / EMA_WARMUP), and ema_decay caps it."""
    return min(t.ema_decay, (1 + updates) / (EMA_WARMUP + updates)) if t.ema_warmup else t.ema_decay


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


def prepare_run_dir(run_dir: Path, cfg: RunConfig | None, write: bool = True) -> RunConfig:
    """A new run folder gets the config; an existing one must hold the same config but for `sample`, `eval`
    and `distributed` (then we resume). Only the writer (rank 0) writes; every rank checks."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = from_yaml_text(saved.read_text(), str(saved))
        if cfg is None:
            return old
        if to_yaml(replace(old, sample=cfg.sample, eval=cfg.eval, distributed=cfg.distributed)) != to_yaml(cfg):  # these may change on resume
            a, b = to_yaml(old).splitlines(), to_yaml(cfg).splitlines()
            diff = [f"{x.strip()} -> {y.strip()}" for x, y in zip(a, b) if x != y][:3]
            raise UserError(f"{run_dir} was started with another config ({'; '.join(diff)}); use a new --out or the same config")
    elif cfg is None:
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); pass --config to start a run")
    if not write:
        return cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    tmp.rename(saved)
    return cfg


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


class Trainer:
    def __init__(self, cfg: RunConfig | None, run_dir: str | Path, progress: bool = True, dist: Dist | None = None):
        self.run_dir = Path(run_dir)
        rank, world, _ = env_world() if dist is None else (dist.rank, dist.world_size, dist.local_rank)
        if cfg is None:  # resume: the run folder's saved config
            cfg = prepare_run_dir(self.run_dir, None, write=False)
            dataset = build_dataset(cfg.data)
        else:
            dataset = build_dataset(cfg.data)
            cfg = resolve_run_config(apply_init_from(cfg), dataset)
        t = cfg.train
        for i, stage in enumerate(cfg.stages):  # before anything is written
            check_divisible(stage.batch_size or t.batch_size, world, t.grad_accum, f"stages.{i} ({stage.name})")
        self.cfg, self.dataset = prepare_run_dir(self.run_dir, cfg, write=rank == 0), dataset
        self.dist = dist or init_from_env(cfg.distributed, pick_device(t.device))
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        self.strategy = cfg.distributed.strategy
        self.fsdp = self.dist.active and self.strategy == "fsdp"
        if self.fsdp and t.precision == "fp16":
            raise UserError("train.precision fp16 is not supported with distributed.strategy fsdp (per-shard loss scaling); use bf16")
        torch.manual_seed(t.seed)  # the model's initial weights (the same on every rank)
        self.model = build_model(cfg.model).to(self.device)
        self.model.grad_checkpointing = t.grad_checkpointing
        if t.init_from is not None and not ckpt.list_checkpoints(self.run_dir):  # a fresh run starts from these weights (the EMA too)
            self.model.load_state_dict(ckpt.load_weights(ckpt.resolve_weights(t.init_from, use_ema=True))[0])
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.fsdp:  # the EMA is sharded like the model: each rank averages its own shards
            shard_model(self.model)
            shard_model(self.ema)
        trainable = [(n, p, e) for (n, p), e in zip(self.model.named_parameters(), self.ema.parameters()) if p.requires_grad]
        self.param_names = [n for n, _, _ in trainable]  # the optimizer's order: its saved state is keyed by index
        self.params, self.ema_params = [p for _, p, _ in trainable], [e for _, _, e in trainable]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.stages[0].lr, betas=tuple(t.optim.betas), weight_decay=t.optim.weight_decay,
            eps=t.optim.eps, fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.generator = torch.Generator().manual_seed(t.seed)
        self.objective = build_objective(cfg.objective, cfg.model.num_classes, cfg.model.learn_sigma)
        self.ddp = None
        if self.dist.active and not self.fsdp:  # buffers are fixed and equal on every rank: no broadcast
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        wrapped = self.ddp or self.model
        self.forward = torch.compile(wrapped, mode=t.compile_mode, fullgraph=t.compile_fullgraph, dynamic=False) if t.compile else wrapped
        self.step, self.position = 0, 0
        self.train_seconds = 0.0  # wall-clock of the training steps so far (evaluation and sample grids excluded), kept across resumes
        self.evaluator = None  # built at the first evaluation (feature networks, reference statistics)
        self.stream_rows = None  # this rank's rows of each global batch (None: all)
        self.to_pixels = pixel_decoder(cfg.data, self.device)  # latents -> images for grids and evaluation
        self.config_yaml = to_yaml(cfg)
        latest = ckpt.list_checkpoints(self.run_dir)
        if latest:
            self.load(latest[-1])

    # ------------------------------------------------------------------ state

    def train_state(self, generator_state: torch.Tensor, optimizer_state: dict) -> dict:
        return {
            "step": self.step,
            "position": self.position,
            "train_seconds": self.train_seconds,
            "world_size": self.dist.world_size,
            "strategy": self.strategy,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "generator": generator_state,
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

    def save(self, generator_state: torch.Tensor | None = None) -> Path:
        """Rank 0 writes the checkpoint (atomically) once every rank's part is gathered; the others wait."""
        model, ema, optim = self.full_states()
        if self.dist.is_main:
            state = self.train_state(self.generator.get_state() if generator_state is None else generator_state, optim)
            ckpt.save_checkpoint(self.run_dir, self.step, model, ema, state, self.config_yaml, self.cfg.train.keep_last)
        barrier(self.dist, f"waiting for rank 0 to write checkpoint step {self.step}")
        return ckpt.step_dir(self.run_dir, self.step)

    def load(self, folder: Path) -> None:
        """Every rank reads the full checkpoint (any world size, any strategy) and keeps what it holds."""
        weights = [ckpt.load_weights(folder / name)[0] for name in ("model.safetensors", "ema.safetensors")]
        state = ckpt.load_train_state(folder / "state.pt")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            opts = full_state_options(cpu_offload=False)
            with collective(self.dist, f"loading checkpoint {folder.name} into the shards"):
                set_model_state_dict(self.model, weights[0], options=opts)
                set_model_state_dict(self.ema, weights[1], options=opts)
                named = optimizer_state_by_name(state["optimizer"], self.param_names)
                set_optimizer_state_dict(self.model, self.optimizer, named, options=opts)
        else:
            self.model.load_state_dict(weights[0])
            self.ema.load_state_dict(weights[1])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.position = state["step"], state["position"]
        self.train_seconds = state.get("train_seconds", 0.0)  # absent in checkpoints written before it was kept
        saved = (state.get("world_size", 1), state.get("strategy", "ddp"))
        if saved != (self.dist.world_size, self.strategy) and self.dist.is_main:
            print(self.world_change_note(*saved), file=sys.stderr)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file() and self.dist.is_main:  # drop lines logged after this checkpoint by the run that stopped
            lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in lines))

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

        The batch holds this rank's rows (its block of each micro-batch); every random draw is made for the
        global batch or micro-batch and sliced, so the ranks together compute exactly one process's step."""
        t, m, shard = self.cfg.train, self.cfg.model, self.dist.shard
        total = torch.zeros((), device=self.device)
        x = posterior_sample(batch, self.generator, self.stream_rows, batch.x.shape[0] * self.dist.world_size)  # latents: a fresh posterior sample
        features = batch.features.chunk(t.grad_accum) if m.repa_depth else [None] * t.grad_accum
        for i, (xm, ym, fm) in enumerate(zip(x.chunk(t.grad_accum), batch.y.chunk(t.grad_accum), features)):
            b = xm.shape[0]
            n = b * self.dist.world_size  # the global micro-batch
            mask = make_mask(n, m.grid, stage.mask_ratio, stage.mask_type, self.generator)
            mask = None if mask is None else mask.rows(self.dist.rank * b, (self.dist.rank + 1) * b)
            path_drop = shard_rows(torch.rand(n, generator=self.generator) < m.path_drop_prob, shard) if m.path_drop_prob > 0 else None
            with self.grad_sync(last=i == t.grad_accum - 1):
                with self.autocast():
                    loss = self.objective.loss(
                        self.forward, xm.to(self.device), ym.to(self.device), self.generator, shard=shard,
                        mask=None if mask is None else mask.to(self.device),
                        path_drop=None if path_drop is None else path_drop.to(self.device),
                        features=None if fm is None else fm.to(self.device),
                    )
                self.scaler.scale(loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        return total

    def update(self) -> torch.Tensor:
        """Unscale, clip, optimizer step, EMA; returns the gradient norm before clipping."""
        t = self.cfg.train
        self.scaler.unscale_(self.optimizer)
        max_norm = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # FSDP: a DTensor, the norm over all shards
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - ema_decay_at(t, self.step))
        return grad_norm

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
        rows = torch.linspace(0, classes - 1, min(classes, t.grid_rows)).round().long().tolist()
        labels = [c for c in rows for _ in range(t.grid_columns)]
        images = generate_on_ranks(self.sampling_model(), self.objective, labels, list(range(len(labels))), self.cfg.sample, self.dist)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        return save_grid(self.to_pixels(images), path, columns=t.grid_columns) if self.dist.is_main else path

    def evaluate(self) -> dict:
        """Metrics of eval.num_samples EMA samples (the `sample` settings), logged with the step, training FLOPs and
        seconds. Every rank samples its share; rank 0 scores them (the others get an empty record)."""
        from .evaluate import flatten, generate_and_score

        cfg = self.cfg
        tic = time.perf_counter()
        data_root = cfg.data.root if cfg.data.name == "fashion_mnist" else None
        scored = generate_and_score(self.sampling_model(), self.objective, cfg.eval, cfg.sample, self.dist, self.to_pixels, self.evaluator, data_root)
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
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self, stop_at: int | None = None) -> Path:
        """Run the remaining steps (up to global step `stop_at`, if given); returns the last checkpoint folder."""
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        end = total_steps(cfg) if stop_at is None else min(stop_at, total_steps(cfg))
        last = ckpt.list_checkpoints(self.run_dir)
        if self.step >= end:
            return last[-1] if last else self.save()
        interval = 0.5 if sys.stderr.isatty() else 30.0  # keep redirected logs (e.g. SLURM) short
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True, mininterval=interval)
        stream, stream_stage, last = None, None, (last[-1] if last else None)
        loss_sum, loss_count, tick, tick_step = torch.zeros((), device=self.device), 0, time.perf_counter(), self.step
        updating, snapshot = False, (self.step, self.generator.get_state())
        self.model.train()
        try:
            while self.step < end:
                began = time.perf_counter()
                index, start = stage_at(cfg.stages, self.step)
                stage = cfg.stages[index]
                batch = stage.batch_size or t.batch_size
                if stream_stage != index:
                    self.stream_rows = rank_rows(batch, t.grad_accum, self.dist.shard) if self.dist.active else None
                    stream, stream_stage = batches(self.dataset, batch, t.seed, self.position, cfg.data.num_workers, self.stream_rows), index
                snapshot = (self.step, self.generator.get_state())  # what an interrupt before the update saves
                lr = stage_lr(stage, self.step - start)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with collective(self.dist, f"training step {self.step + 1} (gradient all-reduce)"):
                    loss = self.train_step(next(stream), stage)
                    updating = True  # weights, EMA, step and position change together
                    grad_norm = self.update()
                self.step += 1
                self.position += batch
                updating = False
                self.train_seconds += time.perf_counter() - began
                loss_sum, loss_count = loss_sum + loss.float(), loss_count + 1  # stays on the device: no sync per step
                bar.update(1)
                stage_end = self.step == start + stage.steps
                if self.step % t.log_every == 0 or stage_end:
                    rate = (self.step - tick_step) / (time.perf_counter() - tick)
                    record = {
                        "step": self.step, "stage": stage.name, "loss": mean_over_ranks(self.dist, loss_sum).item() / loss_count, "lr": lr,
                        "grad_norm": float(grad_norm), "steps_per_s": rate, "images_per_s": rate * batch,
                        "mask_ratio": stage.mask_ratio, "train_flops": train_flops(cfg, self.step), "train_seconds": self.train_seconds,
                    }
                    self.log(record)
                    bar.set_postfix(stage=stage.name, loss=f"{record['loss']:.4f}", img_s=f"{rate * batch:.0f}")
                    loss_sum, loss_count, tick, tick_step = torch.zeros_like(loss_sum), 0, time.perf_counter(), self.step
                paused = time.perf_counter()
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == end):
                    self.sample_grid()
                if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == end):
                    self.evaluate()
                self.model.train()
                tick += time.perf_counter() - paused  # the step rate counts training time only
                if self.step % t.ckpt_every == 0 or stage_end or self.step == end:
                    last = self.save()
        except KeyboardInterrupt:
            bar.close()
            if self.dist.active:  # ranks stop at different points: no collective save, the last checkpoint stands
                raise UserError(f"interrupted at step {self.step}; distributed runs resume from the last checkpoint ({last})") from None
            if updating:
                raise UserError(f"interrupted inside an optimizer update; resume restarts from {last}") from None
            self.optimizer.zero_grad(set_to_none=True)
            folder = self.save(snapshot[1] if self.step == snapshot[0] else None)
            raise UserError(f"interrupted at step {self.step}; saved {folder}; run the same command to resume") from None
        bar.close()
        return last
