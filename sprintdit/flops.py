"""Analytic model FLOPs of the SiT/SPRINT network: matrix multiplies and attention, counted as 2 FLOPs per
multiply-add (the convention of torch's FlopCounterMode and of MFU figures). Norms, activations, RoPE and
gathers are left out; they are a few percent at most and do not run on the tensor cores.

A training step costs 3x its forward (the backward computes two products per forward product).
"""
from __future__ import annotations

from .config import RunConfig
from .masking import num_kept_random
from .models.sit import TIMESTEP_FREQ_DIM, ModelConfig, mlp_hidden


def linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def block_flops(cfg: ModelConfig, batch: int, tokens: int) -> int:
    """One adaLN-Zero block on (batch, tokens, D)."""
    d, rows = cfg.hidden_size, batch * tokens
    hidden = mlp_hidden(cfg)
    mlp = linear(rows, d, hidden) * (2 if cfg.mlp == "swiglu" else 1) + linear(rows, hidden, d)
    attention = 2 * (2 * batch * tokens * tokens * d)  # QK^T and AV
    return linear(batch, d, 6 * d) + linear(rows, d, 3 * d) + attention + linear(rows, d, d) + mlp


def forward_flops(cfg: ModelConfig, batch: int, mask_ratio: float = 0.0, middle_rows: int | None = None) -> int:
    """One forward of `batch` samples; the middle blocks see the kept tokens of `middle_rows` samples
    (default all: training; fewer: the cheap half of a Path-Drop Guidance step)."""
    n, d = cfg.grid[0] * cfg.grid[1], cfg.hidden_size
    rows = batch if middle_rows is None else middle_rows
    patch_features = cfg.in_channels * cfg.patch_size**2
    total = linear(batch * n, patch_features, d)  # patch embedding
    total += linear(batch, TIMESTEP_FREQ_DIM, d) + linear(batch, d, d)  # timestep MLP
    total += (cfg.encoder_depth + cfg.decoder_depth) * block_flops(cfg, batch, n)
    if rows:
        total += cfg.middle_depth * block_flops(cfg, rows, num_kept_random(mask_ratio, n))  # = N k / g^2 for structured masks
    if cfg.fusion == "concat_linear":
        total += linear(batch * n, 2 * d, d)
    total += linear(batch, d, 2 * d) + linear(batch * n, d, patch_features * (cfg.out_channels // cfg.in_channels))
    return total


def train_step_flops(cfg: RunConfig, stage_index: int) -> int:
    """Model FLOPs of one optimizer step (forward + backward over every micro-batch) in a stage."""
    stage = cfg.stages[stage_index]
    batch = stage.batch_size or cfg.train.batch_size
    return 3 * cfg.train.grad_accum * forward_flops(cfg.model, batch, stage.mask_ratio)


def train_flops(cfg: RunConfig, step: int) -> int:
    """Model FLOPs of the first `step` optimizer steps of a run (its stages in order)."""
    total, start = 0, 0
    for i, stage in enumerate(cfg.stages):
        done = min(max(step - start, 0), stage.steps)
        total += done * train_step_flops(cfg, i)
        start += stage.steps
    return total
