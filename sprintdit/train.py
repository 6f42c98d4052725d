"""The training loop: one run = the config's stages in order (e.g. masked pre-training, full-token fine-tune).

Every random draw of a step (data order aside) comes from one CPU generator whose state is checkpointed
with the optimizer, scaler, step and data position, so stopping and re-running the same command on the
same run folder continues exactly as if it had never stopped.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig, StageConfig, from_yaml_text, to_yaml
from .data import Batch, batches, build_dataset, posterior_sample
from .errors import UserError
from .flops import train_flops
from .images import save_grid
from .masking import check_mask_ratio, make_mask
from .models import ModelConfig, build_model, resolve_model_config
from .objective import ObjectiveConfig, build_objective
from .sampling import DDPM_SAMPLERS, generate
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


def prepare_run_dir(run_dir: Path, cfg: RunConfig | None) -> RunConfig:
    """A new run folder gets the config; an existing one must hold the same config but for `sample` and
    `eval` (then we resume)."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = from_yaml_text(saved.read_text(), str(saved))
        if cfg is None:
            return old
        if to_yaml(replace(old, sample=cfg.sample, eval=cfg.eval)) != to_yaml(cfg):  # sampling and evaluation may change on resume
            a, b = to_yaml(old).splitlines(), to_yaml(cfg).splitlines()
            diff = [f"{x.strip()} -> {y.strip()}" for x, y in zip(a, b) if x != y][:3]
            raise UserError(f"{run_dir} was started with another config ({'; '.join(diff)}); use a new --out or the same config")
    elif cfg is None:
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); pass --config to start a run")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    tmp.rename(saved)
    return cfg


class Trainer:
    def __init__(self, cfg: RunConfig | None, run_dir: str | Path, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.progress = progress
        if cfg is None:  # resume: the run folder's saved config
            cfg = prepare_run_dir(self.run_dir, None)
            dataset = build_dataset(cfg.data)
        else:
            dataset = build_dataset(cfg.data)
            cfg = apply_init_from(cfg)
            cfg = prepare_run_dir(self.run_dir, resolve_run_config(cfg, dataset))
        self.cfg, self.dataset = cfg, dataset
        t = cfg.train
        self.device = pick_device(t.device)
        torch.manual_seed(t.seed)  # the model's initial weights
        self.model = build_model(cfg.model).to(self.device)
        self.model.grad_checkpointing = t.grad_checkpointing
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        trainable = [(p, e) for p, e in zip(self.model.parameters(), self.ema.parameters()) if p.requires_grad]
        self.params, self.ema_params = [p for p, _ in trainable], [e for _, e in trainable]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.stages[0].lr, betas=tuple(t.optim.betas), weight_decay=t.optim.weight_decay,
            eps=t.optim.eps, fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.generator = torch.Generator().manual_seed(t.seed)
        self.objective = build_objective(cfg.objective, cfg.model.num_classes, cfg.model.learn_sigma)
        self.forward = (
            torch.compile(self.model, mode=t.compile_mode, fullgraph=t.compile_fullgraph, dynamic=False) if t.compile else self.model
        )
        self.step, self.position = 0, 0
        self.evaluator = None  # built at the first evaluation (feature networks, reference statistics)
        self.to_pixels = pixel_decoder(cfg.data, self.device)  # latents -> images for grids and evaluation
        self.config_yaml = to_yaml(cfg)
        latest = ckpt.list_checkpoints(self.run_dir)
        if latest:
            self.load(latest[-1])
        elif t.init_from is not None:  # a fresh run starts from these weights (the EMA too)
            state, _ = ckpt.load_weights(ckpt.resolve_weights(t.init_from, use_ema=True))
            for module in (self.model, self.ema):
                module.load_state_dict(state)

    # ------------------------------------------------------------------ state

    def train_state(self, generator_state: torch.Tensor) -> dict:
        return {
            "step": self.step,
            "position": self.position,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": generator_state,
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, generator_state: torch.Tensor | None = None) -> Path:
        state = self.train_state(self.generator.get_state() if generator_state is None else generator_state)
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.model.state_dict(), self.ema.state_dict(), state, self.config_yaml, self.cfg.train.keep_last
        )

    def load(self, folder: Path) -> None:
        for name, module in (("model.safetensors", self.model), ("ema.safetensors", self.ema)):
            state, _ = ckpt.load_weights(folder / name)
            module.load_state_dict(state)
        state = ckpt.load_train_state(folder / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.position = state["step"], state["position"]
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():  # drop lines logged after this checkpoint by the run that stopped
            lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in lines))

    # ------------------------------------------------------------------ steps

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.cfg.train.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self, batch: Batch, stage: StageConfig) -> torch.Tensor:
        """Forward and backward over `grad_accum` micro-batches (gradients summed); returns the mean loss."""
        t, m = self.cfg.train, self.cfg.model
        total = torch.zeros((), device=self.device)
        x = posterior_sample(batch, self.generator)  # latents: a fresh posterior sample from the step's generator
        features = batch.features.chunk(t.grad_accum) if m.repa_depth else [None] * t.grad_accum
        for xm, ym, fm in zip(x.chunk(t.grad_accum), batch.y.chunk(t.grad_accum), features):
            b = xm.shape[0]
            mask = make_mask(b, m.grid, stage.mask_ratio, stage.mask_type, self.generator)
            path_drop = torch.rand(b, generator=self.generator) < m.path_drop_prob if m.path_drop_prob > 0 else None
            with self.autocast():
                loss = self.objective.loss(
                    self.forward, xm.to(self.device), ym.to(self.device), self.generator,
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - t.ema_decay)
        return grad_norm

    def sample_grid(self) -> Path:
        """EMA samples, one row per class (classes spread evenly when there are more rows than fit)."""
        t, classes = self.cfg.train, self.cfg.model.num_classes
        rows = torch.linspace(0, classes - 1, min(classes, t.grid_rows)).round().long().tolist()
        labels = [c for c in rows for _ in range(t.grid_columns)]
        images = self.to_pixels(generate(self.ema, self.objective, labels, list(range(len(labels))), self.cfg.sample, self.device))
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", columns=t.grid_columns)

    def evaluate(self) -> dict:
        """Metrics of eval.num_samples EMA samples (the `sample` settings), logged with the step and training FLOPs."""
        from .evaluate import Evaluator, eval_labels_and_seeds, flatten, to_uint8_nchw

        cfg = self.cfg
        tic = time.perf_counter()
        labels, seeds = eval_labels_and_seeds(cfg.eval, cfg.model.num_classes)
        images = to_uint8_nchw(self.to_pixels(generate(self.ema, self.objective, labels, seeds, cfg.sample, self.device)))
        if self.evaluator is None:
            data_root = cfg.data.root if cfg.data.name == "fashion_mnist" else None
            self.evaluator = Evaluator(cfg.eval, tuple(images.shape[1:]), self.device, data_root)
        results = self.evaluator(images, torch.tensor(labels))
        record = {"step": self.step, "train_flops": train_flops(cfg, self.step), "eval_samples": len(labels), **flatten(results)}
        record["eval_seconds"] = time.perf_counter() - tic
        self.log(record)
        return record

    def log(self, record: dict) -> None:
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
                index, start = stage_at(cfg.stages, self.step)
                stage = cfg.stages[index]
                batch = stage.batch_size or t.batch_size
                if stream_stage != index:
                    stream, stream_stage = batches(self.dataset, batch, t.seed, self.position, cfg.data.num_workers), index
                snapshot = (self.step, self.generator.get_state())  # what an interrupt before the update saves
                lr = stage_lr(stage, self.step - start)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.train_step(next(stream), stage)
                updating = True  # weights, EMA, step and position change together
                grad_norm = self.update()
                self.step += 1
                self.position += batch
                updating = False
                loss_sum, loss_count = loss_sum + loss.float(), loss_count + 1  # stays on the device: no sync per step
                bar.update(1)
                stage_end = self.step == start + stage.steps
                if self.step % t.log_every == 0 or stage_end:
                    rate = (self.step - tick_step) / (time.perf_counter() - tick)
                    record = {
                        "step": self.step, "stage": stage.name, "loss": loss_sum.item() / loss_count, "lr": lr,
                        "grad_norm": float(grad_norm), "steps_per_s": rate, "images_per_s": rate * batch,
                        "mask_ratio": stage.mask_ratio, "train_flops": train_flops(cfg, self.step),
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
            if updating:
                raise UserError(f"interrupted inside an optimizer update; resume restarts from {last}") from None
            self.optimizer.zero_grad(set_to_none=True)
            folder = self.save(snapshot[1] if self.step == snapshot[0] else None)
            raise UserError(f"interrupted at step {self.step}; saved {folder}; run the same command to resume") from None
        bar.close()
        return last
