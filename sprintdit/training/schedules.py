"""Pure schedules of a run, functions of its config and a global step: which stage a step is in, its learning rate,
the EMA decay of an update, and what is due after a step (a log record, a grid, an evaluation, a checkpoint)."""

from __future__ import annotations

import math
from typing import NamedTuple

from ..config import RunConfig, StageConfig, TrainConfig

EMA_WARMUP = 10  # train.ema_warmup: after n updates the decay is min(ema_decay, (1 + n) / (EMA_WARMUP + n))


def ema_decay_at(t: TrainConfig, updates: int) -> float:
    """The EMA decay of the update that follows `updates` earlier ones. With warm-up the average never reaches
    far back into a short run (at n updates it spans about the last n / EMA_WARMUP), and ema_decay caps it."""
    return min(t.ema_decay, (1 + updates) / (EMA_WARMUP + updates)) if t.ema_warmup else t.ema_decay


def ema_updates(cfg: RunConfig, step: int, skipped: list[int]) -> int:
    """The EMA updates before global step `step` (counted from 0) that its warm-up counts: those since the start of the
    latest stage with ema_restart (otherwise the run's), less the skipped non-finite steps (`skipped`, counted from
    1)."""
    index, _ = stage_at(cfg.stages, step)
    origin = max(
        [start for start, s in zip(stage_starts(cfg.stages), cfg.stages[: index + 1]) if s.ema_restart], default=0
    )
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


def stage_batch(cfg: RunConfig, index: int) -> int:
    """The global batch of stage `index` (its own, or train.batch_size)."""
    return cfg.stages[index].batch_size or cfg.train.batch_size


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
    return Due(
        log=step % t.log_every == 0 or stage_end or step == 1,
        grid=periodic(t.sample_every),
        evaluation=periodic(cfg.eval.every),
        checkpoint=step % t.ckpt_every == 0 or stage_end or step == end,
    )
