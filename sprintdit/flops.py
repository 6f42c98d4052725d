"""Analytic model FLOPs of the SiT/SPRINT and SparseDiT networks: matrix multiplies and attention, counted as 2 FLOPs
per
multiply-add (the convention of torch's FlopCounterMode and of MFU figures). Norms, activations, RoPE and
gathers are left out; they are a few percent at most and do not run on the tensor cores.

A training step costs 3x its forward (the backward computes two products per forward product).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch

from .checkpoint import read_config, resolve_weights
from .config import RunConfig
from .density import parse_schedule, side_at
from .masking import TokenMask, num_kept_random
from .models.sit import TIMESTEP_FREQ_DIM, ModelConfig, mlp_hidden
from .models.sparsedit import SparseDiT, sparse_shape
from .sections import ADAPTIVE_SAMPLERS

GIGA, TERA = 1e9, 1e12  # FLOP units in reports


def linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def mlp_flops(cfg: ModelConfig, rows: int) -> int:
    d, hidden = cfg.hidden_size, mlp_hidden(cfg)
    return linear(rows, d, hidden) * (2 if cfg.mlp == "swiglu" else 1) + linear(rows, hidden, d)


def attention_flops(d: int, batch: int, tokens: int, keys: int) -> int:
    """q from `tokens`, k and v from `keys`, QK^T and AV, and the output projection (width d)."""
    rows = batch * tokens
    return linear(rows, d, d) + linear(batch * keys, d, 2 * d) + 2 * (2 * rows * keys * d) + linear(rows, d, d)


def caption_cross_flops(cfg: ModelConfig, batch: int, tokens: int) -> int:
    """A text model's cross-attention from `tokens` image tokens to the max_tokens caption tokens (0 for class
    models)."""
    return attention_flops(cfg.hidden_size, batch, tokens, cfg.text.max_tokens) if cfg.condition == "text" else 0


def caption_encoder_flops(cfg: ModelConfig, batch: int) -> int:
    """The caption's way into the model width: the learned encoder's layers, or the embeddings' projection; and the
    pooled vector."""
    if cfg.condition != "text":
        return 0
    d, tx = cfg.hidden_size, cfg.text
    rows = batch * tx.max_tokens
    if tx.encoder == "learned":
        layer = (
            attention_flops(d, batch, tx.max_tokens, tx.max_tokens)
            + linear(rows, d, int(d * cfg.mlp_ratio))
            + linear(rows, int(d * cfg.mlp_ratio), d)
        )
        total = tx.depth * layer
    else:
        total = linear(rows, tx.dim, d) + linear(rows, d, d)
    return total + (linear(batch, d, d) if tx.pooled else 0)


def modulation_flops(cfg: ModelConfig, batch: int, outputs: int = 6) -> int:
    """A block's adaLN-Zero projection of the conditioning to `outputs` x D (adaLN-single: none, its tables are
    added; the one shared projection is counted once in forward_flops)."""
    return linear(batch, cfg.hidden_size, outputs * cfg.hidden_size) if cfg.adaln == "zero" else 0


def block_flops(cfg: ModelConfig, batch: int, tokens: int, context: int | None = None) -> int:
    """One adaLN-Zero block on (batch, tokens, D); with `context` tokens, its attention is cross-attention to them."""
    d, rows = cfg.hidden_size, batch * tokens
    attention = attention_flops(d, batch, tokens, tokens if context is None else context)
    return modulation_flops(cfg, batch) + attention + caption_cross_flops(cfg, batch, tokens) + mlp_flops(cfg, rows)


def factorised_block_flops(cfg: ModelConfig, index: int, batch: int, per_frame: int) -> int:
    """Block `index` of the factorised video layout (Latte's) on `per_frame` tokens in each of the F frames: a space
    block (even index) attends within each of the B F frames and cross-attends to the caption, a time block across
    the F frames at each of the B per_frame positions; the modulation is made once per sample."""
    frames, d = cfg.grid[0], cfg.hidden_size
    rows = batch * frames * per_frame
    if index % 2 == 0:
        mixing = attention_flops(d, batch * frames, per_frame, per_frame)
        mixing += caption_cross_flops(cfg, batch * frames, per_frame)
    else:
        mixing = attention_flops(d, batch * per_frame, frames, frames)
    return mixing + modulation_flops(cfg, batch) + mlp_flops(cfg, rows)


def factorised_body_flops(cfg: ModelConfig, batch: int, rows: int, mask_ratio: float) -> int:
    """The factorised layout's blocks: encoder and decoder dense, the middle on the kept tokens of `rows` samples
    (the same positions in every frame: ModelConfig.mask_grid)."""
    sp, per = cfg.sprint, cfg.frame_tokens
    middle = range(sp.encoder_depth, cfg.depth - sp.decoder_depth)
    kept = num_kept_random(mask_ratio, per)
    return sum(
        factorised_block_flops(cfg, i, rows, kept) if i in middle else factorised_block_flops(cfg, i, batch, per)
        for i in range(cfg.depth)
        if i not in middle or rows
    )


def pooling_block_flops(cfg: ModelConfig, batch: int, tokens: int) -> int:
    """A Poolingformer block: V and the output projection act on one mean token per sample."""
    d = cfg.hidden_size
    return (
        modulation_flops(cfg, batch)
        + 2 * linear(batch, d, d)
        + caption_cross_flops(cfg, batch, tokens)
        + mlp_flops(cfg, batch * tokens)
    )


def factorised_sparsedit_flops(cfg: ModelConfig, batch: int, side: int) -> int:
    """SparseDiT on the factorised layout: every block by its kind and axis, sparse ones on side x side tokens in
    each frame; Poolingformers average per frame (space) or per position (time); merge and recover (space blocks)
    cross-attend within each frame."""
    frames, per, d = cfg.grid[0], cfg.frame_tokens, cfg.hidden_size
    m = side * side
    total = cfg.sparse.modules * 2 * linear(batch * frames * per, d, d)  # recover fusions W1, W2
    for i, kind in enumerate(SparseDiT.block_kinds(cfg)):
        if kind == "pool":
            means = batch * (frames if i % 2 == 0 else per)
            caption = caption_cross_flops(cfg, batch * frames, per) if i % 2 == 0 else 0
            total += modulation_flops(cfg, batch) + 2 * linear(means, d, d) + caption
            total += mlp_flops(cfg, batch * frames * per)
        elif kind in ("merge", "recover"):
            queries, keys = (m, per) if kind == "merge" else (per, m)
            total += modulation_flops(cfg, batch) + attention_flops(d, batch * frames, queries, keys)
            total += caption_cross_flops(cfg, batch * frames, queries) + mlp_flops(cfg, batch * frames * queries)
        else:
            total += factorised_block_flops(cfg, i, batch, m if kind == "sparse" else per)
    return total


def sparsedit_body_flops(cfg: ModelConfig, batch: int, side: int) -> int:
    """SparseDiT's blocks (and recover fusions) with a side x side sparse grid (per frame)."""
    if cfg.video_layout == "factorised":
        return factorised_sparsedit_flops(cfg, batch, side)
    sp, n, d = cfg.sparse, cfg.num_tokens, cfg.hidden_size
    m = math.prod(sparse_shape(cfg, side))
    module = (
        block_flops(cfg, batch, m, context=n)  # merge: sparse queries, dense keys/values
        + sp.sparse_depth * block_flops(cfg, batch, m)
        + 2 * linear(batch * n, d, d)  # recover fusion W1, W2
        + block_flops(cfg, batch, n, context=m)  # recover: dense queries, sparse keys/values
        + sp.dense_depth * block_flops(cfg, batch, n)
    )
    top = cfg.depth - sp.pool_depth - sp.modules * sp.module_depth
    return sp.pool_depth * pooling_block_flops(cfg, batch, n) + sp.modules * module + top * block_flops(cfg, batch, n)


def forward_flops(
    cfg: ModelConfig, batch: int, mask_ratio: float = 0.0, middle_rows: int | None = None, side: int | None = None
) -> int:
    """One forward of `batch` samples. SiT: the middle blocks see the kept tokens of `middle_rows` samples
    (default all: training; fewer: the cheap half of a Path-Drop Guidance step). SparseDiT: with a
    side x side sparse grid (per frame)."""
    n, d = cfg.num_tokens, cfg.hidden_size
    rows = batch if middle_rows is None else middle_rows
    patch_features = cfg.in_channels * math.prod(cfg.patch)
    total = linear(batch * n, patch_features, d)  # patch embedding
    total += linear(batch, TIMESTEP_FREQ_DIM, d) + linear(batch, d, d)  # timestep MLP
    if cfg.micro_conditions:  # height and width (2 rows a sample) and the aspect ratio, each to D / 3
        total += linear(3 * batch, TIMESTEP_FREQ_DIM, d // 3) + linear(3 * batch, d // 3, d // 3)
    total += caption_encoder_flops(cfg, batch)
    if cfg.arch == "sparsedit":
        if side is None:
            raise ValueError("SparseDiT FLOPs need the sparse grid side")
        total += sparsedit_body_flops(cfg, batch, side)
    else:
        if cfg.video_layout == "factorised":
            total += factorised_body_flops(cfg, batch, rows, mask_ratio)
        else:
            total += (cfg.sprint.encoder_depth + cfg.sprint.decoder_depth) * block_flops(cfg, batch, n)
            if rows:
                # = N k / g^2 for structured masks
                total += cfg.middle_depth * block_flops(cfg, rows, num_kept_random(mask_ratio, n))
        if cfg.sprint.fusion == "concat_linear":
            total += linear(batch * n, 2 * d, d)
    total += modulation_flops(cfg, batch, 2) + linear(
        batch * n, d, patch_features * (cfg.out_channels // cfg.in_channels)
    )
    if cfg.adaln == "single":
        total += linear(batch, d, 6 * d)  # the shared projection (Backbone.t_block)
    return total


def mean_forward_flops(cfg: ModelConfig, batch: int, mask_ratio: float = 0.0, levels: int = 1000) -> float:
    """forward_flops averaged over noise levels uniform in (0, 1): SparseDiT's grid follows t; SiT's does not."""
    if cfg.arch != "sparsedit":
        return forward_flops(cfg, batch, mask_ratio)
    schedule, n = parse_schedule(cfg.sparse.grid), cfg.frame_tokens
    sides = [side_at(schedule, (i + 0.5) / levels, n) for i in range(levels)]
    return sum(forward_flops(cfg, batch, side=s) * sides.count(s) for s in set(sides)) / levels


@functools.lru_cache(maxsize=8)
def teacher_config(path: str) -> ModelConfig:
    """The model config of a distillation teacher (train.distill_from), read from its checkpoint's metadata."""
    return read_config(resolve_weights(path, use_ema=True)).model


def train_step_flops(cfg: RunConfig, stage_index: int) -> int:
    """Model FLOPs of one optimizer step in a stage: forward + backward over the global batch (however it is split
    into micro-batches and ranks), plus the teacher's forward when distilling; for SparseDiT, whose grid follows each
    sample's t, the average over uniform t."""
    stage = cfg.stages[stage_index]
    batch = stage.batch_size or cfg.train.batch_size
    total = 3 * mean_forward_flops(cfg.model.at_frames(stage.frames), batch, stage.mask_ratio)
    if cfg.train.distill_from is not None:
        total += mean_forward_flops(teacher_config(cfg.train.distill_from).at_frames(stage.frames), batch)
    return round(total)


def train_flops(cfg: RunConfig, step: int) -> int:
    """Model FLOPs of the first `step` optimizer steps of a run (its stages in order)."""
    total, start = 0, 0
    for i, stage in enumerate(cfg.stages):
        done = min(max(step - start, 0), stage.steps)
        total += done * train_step_flops(cfg, i)
        start += stage.steps
    return total


class _ForwardRecorder:
    """Stands in for a network inside a sampler: records what each forward is asked for and returns zeros."""

    def __init__(self, model):
        self.config, self.null_class, self.fusion, self.step_options = (
            model.config,
            model.null_class,
            model.fusion,
            model.step_options,
        )
        # (batch, middle_rows, SparseDiT grid side, middle drop ratio)
        self.calls: list[tuple[int, int | None, int | None, float]] = []

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        middle_rows: int | None = None,
        side: int | None = None,
        mask: TokenMask | None = None,
    ) -> torch.Tensor:
        n = self.config.num_tokens
        self.calls.append((x.shape[0], middle_rows, side, 0.0 if mask is None else 1 - mask.num_kept / n))
        return torch.zeros(x.shape[0], self.config.out_channels, *x.shape[2:])


def sampler_forwards(model, objective, scfg) -> list[tuple[int, int | None, int | None, float]]:
    """(batch, middle_rows, SparseDiT grid side, the middle's drop ratio) of every forward the sampler makes for one
    image with the settings `scfg`, found by running the sampler itself on a stand-in network."""
    from .sampling import generate

    recorder = _ForwardRecorder(model)
    generate(recorder, objective, [0], [0], replace(scfg, batch_size=1), "cpu")
    return recorder.calls


def sampling_flops(model, objective, scfg) -> int:
    """Model FLOPs to sample one image with the settings `scfg`: every forward the sampler makes (both halves of a
    guided step, PDG's cheap half without the middle blocks, guidance only inside its interval). SparseDiT's forwards
    use the grid the sampler names at each step, SPRINT's middle the tokens of that step's mask."""
    calls = sampler_forwards(model, objective, scfg)
    return sum(
        forward_flops(model.config, batch, ratio, middle_rows=middle_rows, side=side)
        for batch, middle_rows, side, ratio in calls
    )


def sampling_nfe(model, objective, scfg) -> int | None:
    """Network evaluations per image with the settings `scfg`, both halves of a guided step counted; None for an
    adaptive sampler, whose count depends on the network (the stand-in's zeros would understate it)."""
    if scfg.sampler in ADAPTIVE_SAMPLERS:
        return None
    return sum(call[0] for call in sampler_forwards(model, objective, scfg))
