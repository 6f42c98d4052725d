"""The training loop: one run = the config's stages in order (e.g. masked pre-training, full-token fine-tune).

Every random draw of a step (data order aside) comes from a generator on the training device seeded from
(train.seed, step) (sprintdit.draws), and the data order from (seed, epoch); the checkpoint holds the optimizer, scaler,
step and data position, so stopping and re-running the same command on the same run folder continues exactly as if
it had never stopped.

Under torchrun (see docs/distributed.md) every rank draws the random numbers of the whole global batch and keeps its
rows, and loads its rows of the same global data order, so W ranks train on exactly the samples and noise one process
would; DDP averages the gradients, FSDP2 shards parameters, gradients and optimizer state. Only rank 0 writes;
checkpoints hold full (unsharded) states and resume on any world size or strategy.

The pieces: networks.py (model, EMA, optimizer, wrapping), checkpointer.py (the training state on disk),
periodic.py (records, grids, evaluations), schedules.py (stages, learning rate, EMA decay, what is due),
resolve.py (the config rules that need the data), runfolder.py / runlock.py / stopping.py.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import torch

from ..config import RunConfig, StageConfig, to_yaml
from ..data import Batch, batches, build_dataset, posterior_sample
from ..density import gate_at, time_gates
from ..distributed import (
    Dist,
    any_over_ranks,
    check_divisible,
    collective,
    env_world,
    init_from_env,
    pick_device,
    rank_rows,
)
from ..draws import Draws
from ..errors import Diverged, Stopped, UserError
from ..objective import build_objective
from ..sampling_run import SamplingRun
from ..vae import pixel_decoder
from .checkpointer import Checkpointer, TrainState
from .networks import build_networks
from .periodic import Periodic, StepMeter
from .resolve import load_teacher, resolve_run
from .runfolder import RunFolder
from .schedules import due_after, ema_decay_at, ema_updates, stage_at, stage_batch, stage_lr, total_steps
from .stopping import StopSignals

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """One training process of a run folder: `fit` trains the remaining steps; `sampling_run` is the EMA's sampling
    handle. Public: cfg (resolved), dist, device, folder, state (step, data position, ...), networks, objective."""

    def __init__(self, cfg: RunConfig | None, run_dir: str | Path, progress: bool = True, dist: Dist | None = None):
        self.folder = RunFolder(run_dir)
        world = env_world()[1] if dist is None else dist.world_size
        if cfg is None:  # resume: the run folder's saved config
            cfg = self.folder.check(None)[0]
            self._dataset = build_dataset(cfg.data)
        else:
            self._dataset = build_dataset(cfg.data)
            cfg = resolve_run(cfg, self._dataset)
        t = cfg.train
        for i, stage in enumerate(cfg.stages):
            check_divisible(stage.batch_size or t.batch_size, world, t.grad_accum, f"stages.{i} ({stage.name})")
        self.folder.check(cfg)  # refused before anything is built; nothing is written before the run is opened
        self.cfg = cfg
        self.dist = dist or init_from_env(cfg.distributed, pick_device(t.device))
        self.progress = progress and self.dist.is_main
        fsdp = self.dist.active and cfg.distributed.strategy == "fsdp"
        if fsdp and t.precision == "fp16":
            raise UserError(
                "train.precision fp16 is not supported with distributed.strategy fsdp (per-shard loss scaling); use "
                "bf16"
            )
        fresh = not self.folder.checkpoints()  # a fresh run starts from train.init_from's weights, if given
        table = getattr(self._dataset, "caption_table", None)
        self.networks = build_networks(
            cfg,
            self.dist,
            fsdp,
            init_from=t.init_from if fresh else None,
            empty_text=None if table is None else table.empty,
        )
        self.objective = build_objective(cfg.objective, self.networks.model.null_class, cfg.model.learn_sigma)
        self._distill = load_teacher(cfg, self.device)
        self._gates = (
            time_gates(cfg.model.sparse.grid, cfg.model.frame_tokens, self.objective.time_cdf)
            if t.sparse_gating
            else None
        )
        self._to_pixels = pixel_decoder(cfg.data, self.device)  # latents -> images for grids and evaluation
        self._stream, self._stream_stage = None, None  # the data stream and the stage it was made for (see _next_batch)
        self._checkpointer = Checkpointer(cfg, self.folder, self.networks, self.dist, to_yaml(cfg))
        self._periodic = Periodic(cfg, self.folder, self.dist, self._dataset, self.sampling_run)
        self.state: TrainState = self._checkpointer.open_run()

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def model(self) -> torch.nn.Module:
        return self.networks.model

    @property
    def ema(self) -> torch.nn.Module:
        return self.networks.ema

    def summary(self) -> str:
        """What is about to run, in three lines (the CLI prints it at start-up)."""
        cfg, t, m = self.cfg, self.cfg.train, self.cfg.model
        params = sum(p.numel() for p in self.model.parameters())
        stages = " -> ".join(
            f"{s.name} {s.steps} steps (mask {s.mask_ratio:g}{' ' + s.mask_type if s.mask_ratio else ''}, lr {s.lr:g}, "
            f"batch {s.batch_size or t.batch_size})"
            for s in cfg.stages
        )
        where = f"{self.dist.world_size} ranks ({cfg.distributed.strategy})" if self.dist.active else "1 process"
        latest = self.folder.checkpoints()
        start = (
            f"resuming from step {self.step} of {total_steps(cfg)} ({latest[-1]})"
            if self.step
            else f"starting at step 0 of {total_steps(cfg)}"
        )
        if self._distill is not None:
            stages += f"; target {t.distill_weight:g} x the teacher's ({t.distill_from})"
        return (
            f"{m.preset or 'model'} (arch {m.arch}, fusion {m.sprint.fusion}, {'x'.join(map(str, m.grid))} tokens): "
            f"{params / 1e6:.2f}M parameters on "
            f"{self.device} x {where}, {t.precision}, compile {'on' if t.compile else 'off'}, grad accumulation "
            f"{t.grad_accum}\n"
            f"stages: {stages}\n{start}; run folder {self.run_dir}"
        )

    def sampling_run(self) -> SamplingRun:
        """The EMA's sampling handle on every rank (FSDP: its shards gathered into a full copy, a collective)."""
        ema = self.networks.full_ema(self.cfg.model, self.dist)
        return SamplingRun(ema, self.cfg, self.dist, self.objective, self._to_pixels, self._periodic.evaluator)

    def fit(self, stop_at: int | None = None) -> Path:
        """Run the remaining steps (up to global step `stop_at`, if given); returns the last checkpoint folder.

        A stop signal (see training/stopping.py) ends the run after the current step with a checkpoint and raises
        Stopped; a non-finite step beyond train.max_nonfinite_steps raises Diverged and writes nothing."""
        end = total_steps(self.cfg) if stop_at is None else min(stop_at, total_steps(self.cfg))
        if self.dist.is_main:
            self.folder.hold()
        try:
            with self._periodic.tracking(self.step), StopSignals(quiet=not self.dist.is_main) as stops:
                last = self.folder.checkpoints()
                if self.step >= end:
                    return last[-1] if last else self._checkpointer.save(self.state)
                self.build_graphs(end)
                return self.run_steps(end, stops, last[-1] if last else None)
        finally:
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
            stage, batch = self.cfg.stages[index], stage_batch(self.cfg, index)
            shapes = (batch, stage.frames, stage.mask_ratio, stage.mask_type if stage.mask_ratio else None)
            if shapes in built:
                continue
            rows = rank_rows(batch, t.grad_accum, self.dist.shard) if self.dist.active else None
            with collective(self.dist, f"building the compiled graphs of stage {stage.name}"):
                self.train_step(next(batches(self._dataset, batch, t.seed, 0, 0, rows)), stage)
            self.networks.optimizer.zero_grad(set_to_none=True)
            built.add(shapes)
        self._periodic.log(
            {"step": self.step, "event": "graphs_built", "stages": len(built), "seconds": time.perf_counter() - tic}
        )

    def _stop_requested(self, stops: StopSignals, agreed: bool = False) -> bool:
        """The stop decision after a step: every rank agreed on one in the step's update (`agreed`), or, in a single
        process, which need not wait for agreement, a signal has arrived."""
        return agreed or (not self.dist.active and stops.signum is not None)

    def run_steps(self, end: int, stops: StopSignals, last: Path | None) -> Path:
        """The training loop: one optimizer step per iteration, then what is due after it (`due_after`: a log record,
        a sample grid, an evaluation, a checkpoint). `last` is the newest checkpoint; the return value too."""
        from tqdm import tqdm

        s, periodic = self.state, self._periodic
        interval = 0.5 if sys.stderr.isatty() else 30.0  # keep redirected logs (e.g. SLURM) short
        bar = tqdm(
            total=end, initial=s.step, disable=not self.progress, unit="step", dynamic_ncols=True, mininterval=interval
        )
        meter = StepMeter(self.device, s.step)
        self._stream_stage = None  # a fresh data stream from the saved position
        # a run stopped right after a step skips that step's grid and evaluation: do them first
        stop = s.step > 0 and periodic.after_step(
            due_after(self.cfg, s.step, end), s.step, s.train_seconds, stops, missing_only=True
        )
        try:
            while s.step < end and not stop:
                began = time.perf_counter()
                index, stage, lr = self._begin_step()
                with collective(self.dist, f"training step {s.step + 1} (gradient all-reduce)"):
                    loss = self.train_step(self._next_batch(index), stage)  # forward and backward of every micro-batch
                    grad_norm, skipped, agreed = self.update(loss, stops.signum is not None)  # one host sync per step
                if skipped:
                    # past train.max_nonfinite_steps: Diverged, nothing saved
                    self._nonfinite(loss, grad_norm, index, last)
                s.step += 1
                s.position += stage_batch(self.cfg, index)
                s.train_seconds += time.perf_counter() - began
                meter.add(None if skipped else loss)
                bar.update(1)
                due = due_after(self.cfg, s.step, end)
                record = (
                    periodic.log_progress(meter, s.step, stage, index, lr, grad_norm, s.train_seconds)
                    if due.log
                    else None
                )
                if record is not None:
                    bar.set_postfix(
                        stage=stage.name, loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}"
                    )
                with meter.paused():  # the step rate counts training time only; a stop skips the grid and evaluation
                    stop = self._stop_requested(stops, agreed) or periodic.after_step(
                        due, s.step, s.train_seconds, stops
                    )
                if stop or due.checkpoint:
                    with stops.saving():
                        last = self._checkpointer.save(s)
                    stop = stop or self._stop_requested(stops)  # a signal during that save: no further step
        finally:
            bar.close()
        if stop and s.step < end:
            raise Stopped(
                f"{stops.name or 'stop requested on another rank'} at step {s.step}: saved {last}; run the same "
                f"command to resume",
                stops.signum or signal.SIGTERM,
            )
        return last

    def _begin_step(self) -> tuple[int, StageConfig, float]:
        """(stage index, stage, learning rate) of the next step, the rate set on the optimizer."""
        index, start = stage_at(self.cfg.stages, self.step)
        stage = self.cfg.stages[index]
        lr = stage_lr(stage, self.step - start)
        for group in self.networks.optimizer.param_groups:
            group["lr"] = lr
        return index, stage, lr

    def _next_batch(self, index: int) -> Batch:
        """The next batch of stage `index` from the saved data position (a new stream when the stage, and so
        possibly the batch size, changes); under torchrun this rank's rows of the global batch."""
        if self._stream_stage != index:
            t, batch = self.cfg.train, stage_batch(self.cfg, index)
            rows = rank_rows(batch, t.grad_accum, self.dist.shard) if self.dist.active else None
            self._stream = batches(
                self._dataset,
                batch,
                t.seed,
                self.state.position,
                self.cfg.data.num_workers,
                rows,
                pin=self.device.type == "cuda",
            )
            self._stream_stage = index
        return next(self._stream)

    def train_step(self, batch: Batch, stage: StageConfig) -> torch.Tensor:
        """Forward and backward over `grad_accum` micro-batches (gradients summed); returns this rank's mean loss.

        The batch holds this rank's rows (its block of each micro-batch); every random draw (sliced by `Draws`)
        is made for the global batch or micro-batch, so the ranks together compute exactly one process's step."""
        t, m, nets = self.cfg.train, self.cfg.model, self.networks
        draws = Draws.for_step(t.seed, self.step, self.dist.shard, self.device)  # drawn on the device: no copies
        batch = batch.to(self.device)
        total = torch.zeros((), device=self.device)
        x = posterior_sample(batch, draws)  # latents: a fresh posterior sample
        if stage.frames is not None:  # a shorter-clip stage: each clip's first frames
            x = x[:, :, : stage.frames]  # (B, C, frames, H, W)
        grid, tiles = m.at_frames(stage.frames).mask_grid()
        features = batch.features.chunk(t.grad_accum) if m.repa.depth else [None] * t.grad_accum
        dtype = AUTOCAST_DTYPES[t.precision]
        for i, (xm, ym, fm) in enumerate(zip(x.chunk(t.grad_accum), batch.y.chunk(t.grad_accum), features)):
            b = xm.shape[0]  # this rank's rows of the micro-batch
            mask = draws.mask(b, grid, stage.mask_ratio, stage.mask_type, tiles)
            path_drop = draws.rand(b) < m.sprint.path_drop_prob if m.sprint.path_drop_prob > 0 else None
            # SparseDiT: one stratum of t, one grid
            gate = {} if self._gates is None else gate_at(self._gates, self.step * t.grad_accum + i).arguments()
            with nets.grad_sync(last=i == t.grad_accum - 1):
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    loss = self.objective.loss(
                        nets.forward,
                        xm,
                        ym,
                        draws,
                        mask=mask,
                        path_drop=path_drop,
                        features=fm,
                        distill=self._distill,
                        **gate,
                    )
                nets.scaler.scale(loss / t.grad_accum).backward()
            total += loss.detach() / t.grad_accum
        return total

    def update(self, loss: torch.Tensor, stop_requested: bool) -> tuple[torch.Tensor, bool, bool]:
        """Unscale, clip, then (unless the loss or gradient norm is not finite on some rank) optimizer step and EMA.

        Returns (gradient norm before clipping, whether the step was skipped as non-finite, whether any rank asks
        to stop). Both decisions come from one flag tensor: a single host sync per step, and under torchrun one
        small all-reduce, so every rank skips, stops and saves at the same step."""
        t, nets = self.cfg.train, self.networks
        nets.scaler.unscale_(nets.optimizer)
        max_norm = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(nets.params, max_norm)  # FSDP: a DTensor, the norm over all shards
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        nonfinite = ~torch.isfinite(loss)
        if (
            not nets.scaler.is_enabled()
        ):  # fp16: the scaler itself skips steps with inf/NaN gradients and lowers its scale
            nonfinite = nonfinite | ~torch.isfinite(grad_norm)
        flags = torch.stack([nonfinite, torch.tensor(stop_requested, device=self.device)])
        skip, stop = any_over_ranks(
            self.dist, flags, f"checking step {self.step + 1} for non-finite values and stop requests"
        )
        if not skip:
            nets.scaler.step(nets.optimizer)
            with torch.no_grad():
                decay = ema_decay_at(t, ema_updates(self.cfg, self.step, self.state.nonfinite_steps))
                torch._foreach_lerp_(nets.ema_params, nets.params, 1.0 - decay)
        nets.scaler.update()
        nets.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skip, stop

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor, index: int, last: Path | None) -> None:
        """Record a skipped non-finite step (train.max_nonfinite_steps of them), or stop the run (nothing is saved)."""
        t, stage, skipped = self.cfg.train, self.cfg.stages[index], self.state.nonfinite_steps
        skipped.append(self.step + 1)
        what = f"step {self.step + 1} ({stage.name}): loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}"
        self._periodic.log(
            {"step": self.step + 1, "event": "nonfinite", "loss": float(loss), "grad_norm": float(grad_norm)}
        )
        if len(skipped) <= t.max_nonfinite_steps:
            if self.dist.is_main:
                print(
                    f"warning: skipped {what} ({len(skipped)} of train.max_nonfinite_steps {t.max_nonfinite_steps})",
                    file=sys.stderr,
                )
            return
        kept = f"the last checkpoint {last} stands" if last else "no checkpoint was written"
        raise Diverged(
            f"training diverged at {what}; nothing was saved, {kept}; lower stages.{index}.lr or raise "
            f"train.max_nonfinite_steps"
        )
