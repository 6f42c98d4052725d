"""What a run does besides its steps, when `due_after` says so: metrics records (metrics.jsonl and the optional
loggers), sample grids and evaluations of the EMA (through the trainer's sampling handle), and the step meter that
averages the loss and times the steps between two records."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig, StageConfig
from ..distributed import Dist, any_over_ranks, mean_over_ranks
from ..flops import train_flops
from ..images import save_grid
from ..sampling_run import SamplingRun
from ..tracking import Tracker
from .runfolder import RunFolder
from .schedules import Due, stage_batch
from .stopping import StopNow, StopSignals


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


class Periodic:
    """The records, grids and evaluations of one run. `sampling_run` gives the EMA's sampling handle (a collective
    under FSDP: every rank calls it); rank 0 writes."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, d: Dist, dataset, sampling_run: Callable[[], SamplingRun]):
        self.cfg, self.folder, self.dist, self.dataset, self.sampling_run = cfg, folder, d, dataset, sampling_run
        self.tracker: Tracker | None = None  # while a run is fitting (rank 0): the optional loggers
        self.evaluator = None  # built at the first evaluation (feature networks, reference statistics), then kept

    @contextlib.contextmanager
    def tracking(self, step: int):
        """The optional loggers (train.loggers), open while the run fits."""
        if self.dist.is_main:
            self.tracker = Tracker(self.cfg.train.loggers, self.folder.path, asdict(self.cfg), step)
        try:
            yield
        finally:
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            record = self.folder.log(record)
            if self.tracker is not None:
                self.tracker.scalars(record)

    def log_progress(
        self,
        meter: StepMeter,
        step: int,
        stage: StageConfig,
        index: int,
        lr: float,
        grad_norm: torch.Tensor,
        train_seconds: float,
    ) -> dict | None:
        """One metrics record: the mean loss since the last one (over ranks), rates and the run's FLOPs and seconds;
        None when every step since the last record was skipped as non-finite."""
        if not meter.count:
            return None
        rate, batch = meter.rate(step), stage_batch(self.cfg, index)
        record = {
            "step": step,
            "stage": stage.name,
            "loss": meter.mean_loss(self.dist),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "steps_per_s": rate,
            "images_per_s": rate * batch,
            "mask_ratio": stage.mask_ratio,
            "train_flops": train_flops(self.cfg, step),
            "train_seconds": train_seconds,
        }
        self.log(record)
        meter.reset(step)
        return record

    def sample_grid(self, run: SamplingRun, step: int) -> Path:
        """EMA samples, one row per class (classes spread evenly when there are more rows than fit; a text model: one
        row per caption of the first training items); the sampling batches are spread over the ranks, rank 0 writes."""
        t, classes = self.cfg.train, self.cfg.model.num_classes
        if self.cfg.model.condition == "text":
            rows = self.dataset.load(torch.arange(min(t.grid_rows, len(self.dataset))))[1].tolist()
        else:
            rows = torch.linspace(0, classes - 1, min(classes, t.grid_rows)).round().long().tolist()
        labels = [c for c in rows for _ in range(t.grid_columns)]
        images, _ = run.generate(labels, list(range(len(labels))))
        path = self.folder.grid_path(step)
        if self.dist.is_main:
            save_grid(images, path, columns=t.grid_columns)
            if self.tracker is not None:
                self.tracker.image("samples", path, step)
        return path

    def evaluate(self, run: SamplingRun, step: int, train_seconds: float) -> dict:
        """Metrics of eval.num_samples EMA samples (the `sample` settings), logged with the step, training FLOPs and
        seconds. Every rank samples its share; rank 0 scores them (the others get an empty record)."""
        from ..evaluate import flatten

        tic = time.perf_counter()
        run.evaluator = self.evaluator
        scored = run.score()
        if scored is None:
            return {}
        self.evaluator = scored.evaluator
        record = {
            "step": step,
            "train_flops": train_flops(self.cfg, step),
            "train_seconds": train_seconds,
            "eval_samples": len(scored.labels),
            **flatten(scored.results),
            "sample_seconds": scored.sample_seconds,
            "eval_seconds": time.perf_counter() - tic,
            "provenance": scored.results["provenance"],
        }
        self.log(record)
        return record

    def after_step(
        self, due: Due, step: int, train_seconds: float, stops: StopSignals, missing_only: bool = False
    ) -> bool:
        """The sample grid and evaluation `due` at this step (with `missing_only`, those a stop at this step skipped);
        a stop signal aborts them at once in a single process. Returns whether a stop aborted them."""
        grid = due.grid and not (missing_only and self.folder.grid_path(step).is_file())
        scored = due.evaluation and not (missing_only and self.folder.has_evaluation(step))
        if missing_only:  # rank 0 (which writes) decides for all
            mine = torch.tensor([grid, scored]) if self.dist.is_main else torch.zeros(2)
            grid, scored = any_over_ranks(self.dist, mine, "agreeing on the evaluations to catch up")
        try:
            with stops.abortable(
                allowed=not self.dist.active
            ):  # ranks must not leave a collective early (a pending stop aborts at once)
                run = self.sampling_run() if grid or scored else None
                if grid:
                    self.sample_grid(run, step)
                if scored:
                    self.evaluate(run, step, train_seconds)
        except StopNow:
            return True
        return False
