"""SiT / DiT backbone with the SPRINT sparse-dense residual fusion, in one file.

    x (B, C, H, W) -> patchify/embed -> encoder blocks (all tokens) -> h_dense
                   -> [drop tokens] -> middle blocks (kept tokens) -> restore, MASK at dropped -> h_sparse
                   -> fuse: Linear_{2D->D}(concat[h_sparse, h_dense])        ("concat_linear")
                   -> decoder blocks (all tokens) -> final adaLN layer -> unpatchify -> (B, C_out, H, W)

Video: x (B, C, F, H, W) with model.input_size [F, H, W]; a token is patch_size_t frames by patch_size^2 pixels,
tokens in (frame, row, column) raster order, and positions are 3D (`axis_channels`). With F = 1 the network is the
image model exactly (same weights, same outputs). A SiT also takes clips shorter than model.input_size (a training
stage's `frames`): their tokens are the first rows of the raster order and keep those rows' positions.

All blocks live in one `blocks` list (a dense SiT's layout); the encoder / middle / decoder split is a
pair of depths. With fusion "none" and no mask the network is exactly a dense SiT. The network knows
nothing about noise schedules or guidance: see `sprintdit.objective` and `sprintdit.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..density import RECOVERS, check_schedule, parse_schedule
from ..errors import UserError, warn
from ..masking import TokenMask, gather_tokens, restore_tokens
from ..sections import ModelConfig, RepaConfig, SprintConfig, TextConfig  # noqa: F401 (re-exported here)

# (hidden size, depth, heads). S/B/L/XL are the published DiT/SiT sizes; Ti, Mini (narrow and deep: room for a
# 2/8/2 SPRINT split or several SparseDiT modules) and Nano are CPU-sized.
SIZES = {
    "XL": (1152, 28, 16),
    "L": (1024, 24, 16),
    "B": (768, 12, 12),
    "S": (384, 12, 6),
    "Ti": (192, 8, 3),
    "Mini": (128, 12, 4),
    "Nano": (64, 4, 2),
}
PATCH_SIZES = (2, 4, 8)
PRESETS = {
    f"SiT-{name}/{p}": dict(hidden_size=d, depth=depth, num_heads=heads, patch_size=p)
    for name, (d, depth, heads) in SIZES.items()
    for p in PATCH_SIZES
}
ARCHS = ("sit", "sparsedit")
CONDITIONS = ("class", "text")
TEXT_ENCODERS = (
    "learned",
    "t5",
    "clip",
)  # learned: trained with the model; t5, clip: frozen transformers models (sprintdit.text_encoders)
PAD, START = (
    0,
    1,
)  # token ids of the padding and of the start token every caption begins with (the empty text: START alone)
SPECIAL_TOKENS = 2
NULL_CAPTIONS = ("encoded", "learned")  # model.text.null_caption
FUSIONS = ("concat_linear", "none")
POS_EMBEDS = ("rope", "sincos")
ADALNS = ("zero", "single")
VIDEO_LAYOUTS = ("joint", "factorised")
BLOCK_AXES = ("joint", "space", "time")  # what a block attends over (factorised video: space, time, space, ...)
UNSET_ALLOWED = ("preset", "pos_base")  # the model fields that may stay None
MODULATIONS = 6  # shift, scale, gate of the attention and of the MLP
MLPS = ("gelu", "swiglu")
TIMESTEP_FREQ_DIM = 256  # sinusoidal timestep features fed to the timestep MLP


def null_condition(cfg: ModelConfig) -> int | torch.Tensor:
    """What the unconditional pass is given: the null label (index num_classes), the empty text's ids (max_tokens,),
    or for precomputed embeddings an all-zero caption (max_tokens, dim), which the network reads as the empty text."""
    if cfg.condition == "class":
        return cfg.num_classes
    if cfg.text.encoder != "learned":
        return torch.zeros(cfg.text.max_tokens, cfg.text.dim)
    empty = torch.full((cfg.text.max_tokens,), PAD, dtype=torch.long)
    empty[0] = START
    return empty


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill unset sizes from the preset and check every value; returns a new, complete config."""
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise UserError(f"unknown model preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = replace(cfg, **{k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None})
    if cfg.condition == "text":  # no class table
        cfg = replace(cfg, num_classes=0 if cfg.num_classes is None else cfg.num_classes)
    missing = [f.name for f in fields(cfg) if f.name not in UNSET_ALLOWED and getattr(cfg, f.name) is None]
    if cfg.repa.depth and cfg.repa.dim is None:
        missing.append("repa.dim")
    if missing:
        raise UserError(f"model config needs {', '.join('model.' + m for m in missing)} (or a model.preset)")
    check_values(cfg)
    check_shapes(cfg)
    check_sprint(cfg)
    if cfg.condition == "text":
        check_text(cfg)
    if cfg.arch == "sparsedit":
        check_sparsedit(cfg)
    return replace(cfg, input_size=[int(s) for s in cfg.input_size])


def check_values(cfg: ModelConfig) -> None:
    """Sizes at least 1, numbers in range, choices among the known ones."""
    sizes = {
        "patch_size": cfg.patch_size,
        "patch_size_t": cfg.patch_size_t,
        "hidden_size": cfg.hidden_size,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "in_channels": cfg.in_channels,
        **{f"input_size.{i}": v for i, v in enumerate(cfg.input_size)},
    }
    if cfg.condition == "class":
        sizes["num_classes"] = cfg.num_classes
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"model.{name} must be >= 1, got {value}")
    if cfg.pos_base is not None and (cfg.pos_embed != "sincos" or joint_video(cfg) or cfg.pos_base < 1):
        raise UserError(
            "model.pos_base scales 2D sin-cos positions: it needs model.pos_embed sincos, an image (or factorised "
            "video) model, >= 1"
        )
    if cfg.micro_conditions and (cfg.hidden_size % 3 or cfg.video or cfg.micro_scale < 1):
        raise UserError("model.micro_conditions needs an image model, hidden_size divisible by 3, micro_scale >= 1")
    if not cfg.pos_interpolation > 0:
        raise UserError(f"model.pos_interpolation must be > 0, got {cfg.pos_interpolation}")
    if cfg.time_freq_shift not in (0, 1):
        raise UserError(f"model.time_freq_shift must be 0 (DiT, SiT) or 1 (diffusers' DiT), got {cfg.time_freq_shift}")
    if not cfg.mlp_ratio > 0:
        raise UserError(f"model.mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    if cfg.video_layout == "factorised" and (
        not cfg.video or cfg.patch_size_t != 1 or cfg.depth % 2 or cfg.pos_embed != "sincos"
    ):
        raise UserError(
            "model.video_layout factorised (Latte's) needs a video model, patch_size_t 1, an even depth (space and "
            "time blocks in pairs) and pos_embed sincos"
        )
    sp = cfg.sparse
    if (
        cfg.video_layout == "factorised"
        and cfg.arch == "sparsedit"
        and (sp.pool_depth % 2 or sp.sparse_depth % 2 == 0 or sp.dense_depth % 2 == 0 or sp.frames or sp.readd_pos)
    ):
        raise UserError(
            "SparseDiT on the factorised layout pools each frame in space blocks: its merge and recover blocks must be "
            "space blocks (model.sparse.pool_depth even, sparse_depth and dense_depth odd, e.g. 2 / 3 / 1), and it "
            "keeps every frame (no sparse.frames) and its input positions (no readd_pos)"
        )
    for name, value, choices in (
        ("arch", cfg.arch, ARCHS),
        ("video_layout", cfg.video_layout, VIDEO_LAYOUTS),
        ("mlp", cfg.mlp, MLPS),
        ("pos_embed", cfg.pos_embed, POS_EMBEDS),
        ("adaln", cfg.adaln, ADALNS),
        ("sprint.fusion", cfg.sprint.fusion, FUSIONS),
        ("condition", cfg.condition, CONDITIONS),
    ):
        if value not in choices:
            raise UserError(f"model.{name} is {value!r}; choose one of {', '.join(choices)}")


def joint_video(cfg: ModelConfig) -> bool:
    return cfg.video and cfg.video_layout == "joint"


def position_grid(cfg: ModelConfig) -> tuple[int, ...]:
    """The grid the absolute positions span: the token grid, or one frame's for the factorised layout (whose frames
    get their own table before the first time block)."""
    return cfg.grid[1:] if cfg.video_layout == "factorised" else cfg.grid


def check_shapes(cfg: ModelConfig) -> None:
    """The input, patch, head and position sizes fit together."""
    if len(cfg.input_size) not in (2, 3) or (len(cfg.input_size) == 2 and cfg.patch_size_t != 1):
        raise UserError(
            f"model.input_size {list(cfg.input_size)} must be [H, W] (images; model.patch_size_t 1) or [F, H, W] "
            f"(video)"
        )
    if any(s % p for s, p in zip(cfg.input_size, cfg.patch)):
        raise UserError(
            f"model.input_size {list(cfg.input_size)} is not divisible by the patch {list(cfg.patch)} "
            f"(model.patch_size_t, patch_size)"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise UserError(f"model.hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    position_width = cfg.hidden_size // cfg.num_heads if cfg.pos_embed == "rope" else cfg.hidden_size
    grid = position_grid(cfg)
    if position_width % 4 or any(c < 2 for c, n in zip(axis_channels(position_width, grid), grid) if n > 1):
        raise UserError(
            f"{cfg.pos_embed} positions need a {'head dim' if cfg.pos_embed == 'rope' else 'hidden_size'} divisible by "
            f"4 (and >= 8 for video), got {position_width}"
        )


def check_sprint(cfg: ModelConfig) -> None:
    """The SPRINT split and path drop, and REPA's block."""
    sp, repa = cfg.sprint, cfg.repa
    if min(sp.encoder_depth, sp.decoder_depth) < 0 or cfg.middle_depth < 0:
        raise UserError(
            f"model.sprint: encoder_depth {sp.encoder_depth} + decoder_depth {sp.decoder_depth} exceed depth "
            f"{cfg.depth}"
        )
    if not 0.0 <= sp.path_drop_prob < 1.0:
        raise UserError(f"model.sprint.path_drop_prob must be in [0, 1), got {sp.path_drop_prob}")
    if not 0 <= repa.depth <= cfg.depth or repa.hidden < 1:
        raise UserError(
            f"model.repa.depth must be in [0, depth {cfg.depth}] (0: off) and repa.hidden >= 1, got {repa.depth}, "
            f"{repa.hidden}"
        )
    if sp.fusion == "none" and sp.path_drop_prob > 0:
        raise UserError(
            "model.sprint.path_drop_prob needs a dense path to fall back on: set it to 0 with fusion 'none'"
        )


def check_text(cfg: ModelConfig) -> None:
    tx = cfg.text
    if tx.encoder not in TEXT_ENCODERS:
        raise UserError(f"model.text.encoder is {tx.encoder!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    if tx.encoder != "learned":
        if tx.dim is None or tx.dim < 1 or tx.vocabulary:
            raise UserError(
                f"model.text.encoder {tx.encoder} reads embeddings of width model.text.dim (>= 1; default: the data's) "
                f"and has no vocabulary"
            )
    elif not tx.vocabulary:
        raise UserError(
            "model.text.vocabulary is empty: train on captioned data (it fills the vocabulary) or list the words"
        )
    elif len(set(tx.vocabulary)) != len(tx.vocabulary) or any(
        not w or w != w.strip().lower() or " " in w for w in tx.vocabulary
    ):
        raise UserError("model.text.vocabulary must hold distinct lower-case words without spaces")
    if tx.null_caption not in NULL_CAPTIONS or (tx.null_caption == "learned" and tx.encoder == "learned"):
        raise UserError(
            f"model.text.null_caption is {tx.null_caption!r}; choose one of {', '.join(NULL_CAPTIONS)} (learned: t5 or "
            "clip captions only)"
        )
    if tx.max_tokens < 2 or tx.depth < 0:
        raise UserError(
            f"model.text.max_tokens must be >= 2 (the start token and a word) and depth >= 0, got {tx.max_tokens}, "
            f"{tx.depth}"
        )
    if cfg.num_classes:
        raise UserError(
            f"model.condition text has no class table: leave model.num_classes unset (got {cfg.num_classes})"
        )
    if cfg.pos_embed == "rope":  # measured: the layout demo's captions were ignored with rope (docs/results.md)
        warn(
            "model.condition text with model.pos_embed rope: image tokens carry no absolute position, so captions that "
            "name places "
            "('top left') are not followed; model.pos_embed=sincos gives them one"
        )


def check_sparsedit(cfg: ModelConfig) -> None:
    sp = cfg.sparse
    if cfg.repa.depth:
        raise UserError("model.repa.depth (REPA) is not available with model.arch 'sparsedit'; set it to 0")
    if cfg.sprint.fusion != "none" or cfg.sprint.path_drop_prob > 0:
        raise UserError(
            "model.arch 'sparsedit' has no SPRINT fusion: set model.sprint.fusion=none and "
            "model.sprint.path_drop_prob=0"
        )
    if min(sp.pool_depth, sp.sparse_depth, sp.dense_depth) < 0 or sp.modules < 1:
        raise UserError("model.sparse needs modules >= 1 and pool_depth, sparse_depth, dense_depth >= 0")
    if sp.recover not in RECOVERS:
        raise UserError(f"model.sparse.recover is {sp.recover!r}; choose one of {', '.join(RECOVERS)}")
    if sp.readd_pos and (cfg.pos_embed != "sincos" or cfg.pos_base is not None):
        raise UserError(
            "model.sparse.readd_pos re-adds sin-cos positions: it needs model.pos_embed sincos (RoPE is applied in "
            "every block)"
        )
    if sp.pool_depth + sp.modules * sp.module_depth > cfg.depth:
        raise UserError(
            f"model.sparse: {sp.pool_depth} Poolingformer blocks + {sp.modules} modules x {sp.module_depth} blocks "
            f"exceed depth {cfg.depth}"
        )
    check_schedule(parse_schedule(sp.grid), cfg.grid)
    if sp.frames is not None and not (cfg.video and 1 <= sp.frames <= cfg.grid[0]):
        raise UserError(
            f"model.sparse.frames pools a video's time axis: it needs a video model and 1 <= frames <= "
            f"{cfg.grid[0] if cfg.video else 'the token frames'}, got {sp.frames}"
        )


# ----------------------------------------------------------------------------------- positions


def axis_channels(width: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """How many of the `width` position channels (RoPE: the head dim; sin-cos: hidden_size) each grid axis gets, in
    the grid's axis order, whole channel pairs. Rows and columns get equal shares; a video's time axis gets about a
    quarter (width 32: 8 time, 12 rows, 12 columns), as Wan and CogVideoX split, and none when the grid has a single
    frame: a position every token shares carries nothing, and the split (so the model) is then the image one."""
    pairs = width // 2
    time = pairs // 4 if len(grid) == 3 and grid[0] > 1 else 0
    space = (pairs - time) // 2
    return (2 * (pairs - 2 * space),) * (len(grid) == 3) + (2 * space, 2 * space)


def rope_tables(grid: tuple[int, ...], head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of 2D or 3D RoPE angles, each (N, head_dim), tokens in raster order (n = row * W + col; video:
    (frame * H + row) * W + col)."""
    return rope_at([torch.arange(n, dtype=torch.float64) for n in grid], axis_channels(head_dim, grid), theta)


def rope_at(
    positions: list[torch.Tensor], channels: tuple[int, ...], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (prod(len(p) for p in positions), sum(channels)) of RoPE on the grid of the positions along each
    axis (may be fractional, e.g. pooled-cell centres). Axis a rotates the next channels[a] channels: m of them
    use frequencies theta^(-j/m), j = 0, 2, ..., m-2, each for an adjacent channel pair.
    """
    axes = torch.meshgrid(*[p.double() for p in positions], indexing="ij")
    angles = []
    for pos, m in zip(axes, channels):
        freqs = (theta ** (-torch.arange(0, m, 2, dtype=torch.float64) / m)).repeat_interleave(2)  # (m,)
        angles.append(pos.reshape(-1, 1) * freqs)  # (N, m)
    angles = torch.cat(angles, dim=1)  # (N, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, N, dh); cos/sin: (N, dh) or (B, 1, N, dh). Rotates adjacent channel pairs."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, heads, N, dh/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sincos_table(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sin-cos absolute embedding (N, dim), tokens in raster order (for 2D grids: DiT's table)."""
    return sincos_at([torch.arange(n) for n in grid], axis_channels(dim, grid))


def time_table(frames: int, dim: int) -> torch.Tensor:
    """(frames, dim) the factorised layout's 1D sin-cos table of the frames (Latte's temp_embed)."""
    return sincos_at([torch.arange(frames)], (dim,))


def sincos_positions(cfg: ModelConfig) -> list[torch.Tensor]:
    """Each axis's token positions for the sin-cos table: 0, 1, 2, ... (DiT), or with model.pos_base PixArt's, scaled
    so that any grid spans the base grid: i / (n / pos_base) / pos_interpolation."""
    grid = position_grid(cfg)
    if cfg.pos_base is None:
        return [torch.arange(n) for n in grid]
    return [torch.arange(n, dtype=torch.float64) / (n / cfg.pos_base) / cfg.pos_interpolation for n in grid]


def sincos_at(positions: list[torch.Tensor], channels: tuple[int, ...]) -> torch.Tensor:
    """(prod(len(p) for p in positions), sum(channels)) sin-cos embedding of the grid of the positions along each
    axis (may be fractional). The axes' channel blocks come in reverse axis order (columns first, then rows, then
    a video's frames, as DiT's 2D table); a block of d channels is [sin, cos] of pos * w_i, w_i = 10000^(-i / (d/2)).
    """

    def axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega  # (N, d/2)
        return torch.cat([out.sin(), out.cos()], dim=1)

    axes = torch.meshgrid(*[p.double() for p in positions], indexing="ij")
    return torch.cat([axis(pos, d) for pos, d in reversed(list(zip(axes, channels)))], dim=1).float()


# ----------------------------------------------------------------------------------- layers


def patchify(x: torch.Tensor, patch: int | tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), features in (channel, p_row, p_col) order, tokens row-major; video
    (B, C, F, H, W) with patch (pt, p, p) -> (B, N, C*pt*p*p), features (channel, pt, p_row, p_col), tokens
    (frame, row, column)-major. An int patch is the same along every axis."""
    b, c, *size = x.shape
    patch = (patch,) * len(size) if isinstance(patch, int) else tuple(patch)
    grid, d = [s // q for s, q in zip(size, patch)], len(size)
    x = x.reshape(b, c, *[v for g, q in zip(grid, patch) for v in (g, q)])  # (B, C, g0, q0, g1, q1, ...)
    x = x.permute(0, *range(2, 2 + 2 * d, 2), 1, *range(3, 3 + 2 * d, 2))  # (B, g0, g1, ..., C, q0, q1, ...)
    return x.reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(x: torch.Tensor, patch: int | tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """(B, N, C*prod(patch)) -> (B, C, H, W) or (B, C, F, H, W); inverse of `patchify`."""
    b, d = x.shape[0], len(grid)
    patch = (patch,) * d if isinstance(patch, int) else tuple(patch)
    c = x.shape[-1] // math.prod(patch)
    x = x.reshape(b, *grid, c, *patch)  # (B, g0, g1, ..., C, q0, q1, ...)
    x = x.permute(0, d + 1, *[v for i in range(d) for v in (1 + i, d + 2 + i)])  # (B, C, g0, q0, g1, q1, ...)
    return x.reshape(b, c, *[g * q for g, q in zip(grid, patch)])


def dit_final_rows(w: torch.Tensor, patch: int) -> torch.Tensor:
    """Rows (or bias entries) in DiT's un-patchify order (p_row, p_col, c) -> ours (c, p_row, p_col)."""
    rest = w.shape[1:]
    return w.reshape(patch, patch, -1, *rest).movedim(2, 0).reshape(-1, *rest)


def ours_to_dit_rows(w: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of dit_final_rows: ours (c, p_row, p_col) -> DiT's (p_row, p_col, c)."""
    return w.reshape(-1, patch, patch, *w.shape[1:]).movedim(0, 2).reshape(w.shape)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: tuple[int, ...], in_channels: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_channels * math.prod(patch), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch))  # (B, N, D)


def timestep_frequencies(half: int, device: torch.device | str = "cpu", shift: int = 0) -> torch.Tensor:
    """(half,) frequencies of the sinusoidal timestep features: exp(-ln(10000) i / (half - shift)), in float32
    (shift 0: DiT, SiT; 1: diffusers' DiT, whose timestep projection uses downscale_freq_shift=1)."""
    return torch.exp(-math.log(10000) * torch.arange(half, device=device, dtype=torch.float32) / (half - shift))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, time_scale: float, freq_shift: int = 0, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = time_scale
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        scaled = (t.double() * self.time_scale).float()  # in float64 first: t = k / 1000 (float64) gives exactly k
        args = scaled[:, None] * timestep_frequencies(self.freq_dim // 2, t.device, self.freq_shift)  # (B, half)
        features = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (B, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, index num_classes, for the null (unconditional) label."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class HeadNorm(nn.RMSNorm):
    """RMSNorm over one head's channels (q and k) whose weight follows the input's dtype: under bf16 autocast q and k
    are bf16, and a float32 weight would send torch to its slower unfused path (with a warning on every call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.num_heads
        head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = HeadNorm(head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = HeadNorm(head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope, context: torch.Tensor | None = None, context_rope=None) -> torch.Tensor:
        """Self-attention over x (B, N, D); with `context` (B, M, D), cross-attention: queries from x, keys and
        values from the context (the q rows and the k, v rows of the same qkv weights). rope: (cos, sin) or None."""
        b, n, d = x.shape
        if context is None:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, dh)
            context_rope = rope
        else:
            # (B, h, N, dh)
            q = F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d]).view(b, n, self.heads, -1).transpose(1, 2)
            kv = F.linear(context, self.qkv.weight[d:], self.qkv.bias[d:])  # (B, M, 2D)
            k, v = kv.view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (B, h, M, dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *context_rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the caption's tokens (keys, values), padding masked out (PixArt-alpha's)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), text (B, L, D), keep (B, L) bool (False at padding; at least one True per row) -> (B, N, D)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, dh)
        k, v = self.kv(text).view(b, text.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (B, h, L, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, N, dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TextEncoder(nn.Module):
    """The learned caption encoder: word and position embeddings, then `depth` pre-norm transformer layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, tx = cfg.hidden_size, cfg.text
        self.words = nn.Embedding(len(tx.vocabulary) + SPECIAL_TOKENS, d, padding_idx=PAD)
        self.positions = nn.Parameter(torch.zeros(1, tx.max_tokens, d))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                cfg.num_heads,
                int(d * cfg.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(tx.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) token ids (PAD after the caption) -> tokens (B, L, D), keep (B, L) bool."""
        keep = ids != PAD
        h = self.words(ids) + self.positions[:, : ids.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~keep)
        return self.norm(h), keep


class CaptionProjection(nn.Module):
    """Precomputed caption embeddings (T5, CLIP) into the model width: Linear, GELU (tanh), Linear (PixArt-alpha's).
    Padding rows of a caption are zero; an all-zero caption is the unconditional one and becomes `empty`, the
    encoder's embedding of the empty text (filled from the data at a run's start, saved with the weights)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, tx = cfg.hidden_size, cfg.text
        self.fc1, self.fc2 = nn.Linear(tx.dim, d), nn.Linear(d, d)
        self.mask_padding = tx.mask_padding
        self.register_buffer("empty", torch.zeros(tx.max_tokens, tx.dim))  # (L, E)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, L, E) -> tokens (B, L, D), keep (B, L) bool."""
        null = ~emb.ne(0).any(dim=(1, 2))  # (B,) the unconditional rows
        emb = torch.where(null[:, None, None], self.empty.to(emb.dtype), emb)
        keep = emb.ne(0).any(dim=-1) if self.mask_padding else torch.ones(emb.shape[:2], dtype=torch.bool)  # (B, L)
        return self.fc2(F.gelu(self.fc1(emb), approximate="tanh")), keep.to(emb.device)


def mlp_hidden(cfg: ModelConfig) -> int:
    """MLP width; SwiGLU has two input projections, so 2/3 of the width keeps the GELU MLP's parameter count."""
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    return 2 * hidden // 3 if cfg.mlp == "swiglu" else hidden


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        self.fc1 = nn.Linear(cfg.hidden_size, 2 * hidden if self.swiglu else hidden)
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * value)
        return self.fc2(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero transformer block: c modulates shift/scale/gate of attention and MLP. `axis` (factorised video):
    space blocks attend within each frame, time blocks across the frames at each position (no caption); the first
    time block adds the frames' sin-cos table to its input (Latte's temp_embed, when there is more than one frame)."""

    def __init__(self, cfg: ModelConfig, axis: str = "joint", adds_frames: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.axis = axis
        if adds_frames:
            self.register_buffer("time_pos", time_table(cfg.grid[0], d), persistent=False)  # (F, D)
        else:
            self.time_pos = None
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        if cfg.adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, MODULATIONS * d))
        else:  # added to the shared projection of the timestep embedding (Backbone.t_block)
            self.scale_shift_table = nn.Parameter(torch.randn(MODULATIONS, d) / d**0.5)
        self.cross_attn = CrossAttention(d, cfg.num_heads) if cfg.condition == "text" and axis != "time" else None

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Shift, scale, gate of the attention and of the MLP, each (B, D): adaLN-Zero from c (B, D); adaLN-single
        from the shared part of c (B, 7D: the embedding, then its 6D projection) plus this block's table."""
        if hasattr(self, "adaLN_modulation"):
            return self.adaLN_modulation(c).chunk(MODULATIONS, dim=-1)
        d = self.scale_shift_table.shape[1]
        return (self.scale_shift_table + c[:, d:].unflatten(1, (MODULATIONS, d))).unbind(1)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope,
        context: torch.Tensor | None = None,
        context_rope=None,
        text=None,
        frames: int = 1,
    ) -> torch.Tensor:
        """x (B, N, D), c (B, D). With `context` (B, M, D) the attention is cross-attention to it (SparseDiT's
        merge and recover blocks); the context goes through the same norm and modulation as x. text: (tokens
        (B, L, D), keep (B, L)) of the caption, cross-attended between attention and MLP, unmodulated (PixArt-alpha).
        frames: the clip's token frames (factorised video; x's tokens frame-major)."""
        mods = self.modulation(c)  # 6 x (B, D)
        if self.axis == "joint":
            return self.mix(x, mods, rope, context, context_rope, text)
        b, n, d = x.shape
        per = n // frames  # tokens per frame
        if self.axis == "space":  # (B F, N / F, D), each frame with its sample's modulation and caption
            text = None if text is None else tuple(part.repeat_interleave(frames, 0) for part in text)
            mods = tuple(m.repeat_interleave(frames, 0) for m in mods)
            if context is not None:  # SparseDiT's merge / recover: the other grid's tokens of the same frame
                context = context.reshape(b * frames, -1, d)
            return self.mix(x.reshape(b * frames, per, d), mods, None, context, text=text).reshape(b, n, d)
        h = x.reshape(b, frames, per, d).transpose(1, 2).reshape(b * per, frames, d)  # (B N/F, F, D)
        if self.time_pos is not None and frames > 1:
            h = h + self.time_pos[:frames].to(h.dtype)
        h = self.mix(h, tuple(m.repeat_interleave(per, 0) for m in mods), None)
        return h.reshape(b, per, frames, d).transpose(1, 2).reshape(b, n, d)

    def mix(self, x: torch.Tensor, mods: tuple, rope, context=None, context_rope=None, text=None) -> torch.Tensor:
        """The block on x (B', N', D) with its modulations, 6 x (B', D)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        if context is not None:
            context = modulate(self.norm1(context), shift_a, scale_a)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope, context, context_rope)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, *text)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


def block_axis(cfg: ModelConfig, i: int) -> tuple[str, bool]:
    """Block i's axis, and whether it adds the frames' table (the factorised layout's first time block)."""
    if cfg.video_layout != "factorised":
        return "joint", False
    return ("space", False) if i % 2 == 0 else ("time", i == 1)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.linear = nn.Linear(d, math.prod(cfg.patch) * cfg.out_channels)
        if cfg.adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        else:  # added to the timestep embedding itself (PixArt's T2IFinalLayer)
            self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) or, adaLN-single, (B, 7D) of which the first D are the embedding."""
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        else:
            shift, scale = (self.scale_shift_table + c[:, None, : self.scale_shift_table.shape[1]]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------- network


class Backbone(nn.Module):
    """What every network here shares: patch, timestep and label embedders, positions, the final adaLN layer,
    the block-stack runner and the initialisation. Subclasses build their blocks in `build_body`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.config = cfg
        self.grad_checkpointing = False  # recompute block activations in backward (set by the trainer)
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, cfg.time_scale, cfg.time_freq_shift)
        self.y_embedder = (
            LabelEmbedder(cfg.num_classes, d)
            if cfg.condition == "class"
            else TextEncoder(cfg)
            if cfg.text.encoder == "learned"
            else CaptionProjection(cfg)
        )
        self.text_pool = nn.Linear(d, d) if cfg.condition == "text" and cfg.text.pooled else None
        if cfg.micro_conditions:  # PixArt-alpha 1024: height and width share one MLP, the aspect ratio has its own
            self.size_embedder = TimestepEmbedder(d // 3, 1.0)
            self.aspect_embedder = TimestepEmbedder(d // 3, 1.0)
        # adaLN-single: the one projection of the conditioning that every block's table is added to
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, MODULATIONS * d)) if cfg.adaln == "single" else None
        self.build_body(cfg)
        self.final_layer = FinalLayer(cfg)
        if cfg.pos_embed == "rope":
            cos, sin = rope_tables(cfg.grid, d // cfg.num_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (N, dh)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            grid = position_grid(cfg)
            table = sincos_at(sincos_positions(cfg), axis_channels(d, grid))  # (N, D); factorised: one frame's
            table = table.repeat(cfg.num_tokens // len(table), 1)  # (N, D): every frame the same
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        # REPA head (training only), built after the MASK token so that it is drawn alike with REPA on or off
        self.repa_projector = (
            nn.Sequential(
                nn.Linear(d, cfg.repa.hidden),
                nn.SiLU(),
                nn.Linear(cfg.repa.hidden, cfg.repa.hidden),
                nn.SiLU(),
                nn.Linear(cfg.repa.hidden, cfg.repa.dim),
            )
            if cfg.repa.depth
            else None
        )
        self.initialize_weights()

    def build_body(self, cfg: ModelConfig) -> None:
        raise NotImplementedError

    def step_options(self, t: float) -> dict:
        """Keyword arguments for a forward whose samples all sit at noise level t (a sampling step): none here;
        SparseDiT names its grid side, chosen on the host from t, so a step makes no device sync to choose it."""
        return {}

    @property
    def null_class(self) -> int | torch.Tensor:
        """The unconditional input: the null label, the empty text's token ids (max_tokens,), an all-zero caption
        (max_tokens, dim), or with model.text.null_caption learned the network's own table (which `null_like` masks
        like each caption it replaces)."""
        if self.config.condition == "text" and self.config.text.null_caption == "learned":
            return self.y_embedder.empty
        return null_condition(self.config)

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.config.pos_embed == "rope" else None

    def rope_rows(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The RoPE tables (cos, sin) (tokens, dh) of the first `tokens` tokens: all of them, or a shorter clip's."""
        return None if self.rope is None else tuple(table[:tokens] for table in self.rope)

    def initialize_weights(self) -> None:
        """xavier-uniform linears with zero bias; adaLN modulations and the output zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.condition == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.config.label_init_std)
        elif self.config.text.encoder == "learned":  # positions too: at zero the encoder would read a bag of words
            nn.init.normal_(self.y_embedder.words.weight, std=self.config.init_std)
            nn.init.normal_(self.y_embedder.positions, std=self.config.init_std)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=self.config.init_std)
        modulations = [
            b.adaLN_modulation[-1] for b in [*self.blocks, self.final_layer] if hasattr(b, "adaLN_modulation")
        ]
        if self.t_block is not None:  # adaLN-single (PixArt's init): the shared projection normal, the tables random
            nn.init.normal_(self.t_block[-1].weight, std=self.config.init_std)
        for layer in (*modulations, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for block in self.blocks:
            if getattr(block, "cross_attn", None) is not None:  # each block starts as the unconditioned one
                nn.init.zeros_(block.cross_attn.proj.weight)

    @property
    def repa_block(self) -> nn.Module | None:
        return self.blocks[self.config.repa.depth - 1] if self.config.repa.depth else None

    def run_blocks(
        self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, rope, taps: list | None = None, **context
    ) -> torch.Tensor:
        """The blocks in order; `taps` (if given) receives the output of the REPA block when it is among them;
        `context`: cross-attention inputs (SparseDiT's merge and recover blocks)."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False, **context)
            else:
                x = block(x, c, rope, **context)
            if taps is not None and block is self.repa_block:
                taps.append(x)
        return x

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Tokens (B, N, D) with absolute positions if any, the modulation c (B, D; adaLN-single: (B, 7D), the
        embedding then its shared 6D projection), and the caption (tokens
        (B, L, D), keep (B, L)) for a text model, else None. y: labels (B,), token ids (B, L) or caption embeddings (B,
        L, E)."""
        h = self.x_embedder(x)  # (B, N, D)
        if self.config.pos_embed == "sincos":
            h = h + self.pos_embed[:, : h.shape[1]]
        text = None
        if self.config.condition == "class":
            c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        else:
            tokens, keep = text = self.y_embedder(y)  # (B, L, D), (B, L)
            c = self.t_embedder(t)  # (B, D)
            if self.text_pool is not None:
                w = keep.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
                c = c + self.text_pool((tokens * w).sum(1) / w.sum(1))
        if self.config.micro_conditions:
            c = c + self.micro_embedding(c.shape[0], c.device)
        if self.t_block is not None:  # adaLN-single: c (B, 7D), the embedding and its shared projection
            c = torch.cat([c, self.t_block(c)], dim=-1)
        return h, c, text

    def micro_embedding(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, D): [size(H), size(W), aspect(H / W)] of the image this model makes (input_size x micro_scale pixels)."""
        height, width = (s * self.config.micro_scale for s in self.config.input_size)
        sizes = torch.tensor([height, width], dtype=torch.float64, device=device).repeat(batch)  # (2B,)
        aspect = torch.full((batch,), height / width, dtype=torch.float64, device=device)  # (B,)
        return torch.cat([self.size_embedder(sizes).reshape(batch, -1), self.aspect_embedder(aspect)], dim=1)

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, C_out, H, W) or (B, C_out, F, H, W)."""
        return unpatchify(self.final_layer(h, c), self.config.patch, self.config.token_grid(h.shape[1]))


@dataclass
class RepaTap:
    """Filled by `SiT.forward(..., repa=tap)`: the REPA block's projected tokens (B, K, repa.dim) and the token ids
    they are at (B, K), or None when the block saw all N tokens. (A plain object: DDP and FSDP pass it through.)"""

    projected: torch.Tensor | None = None
    ids_keep: torch.Tensor | None = None


class SiT(Backbone):
    def build_body(self, cfg: ModelConfig) -> None:
        d = cfg.hidden_size
        self.blocks = nn.ModuleList(Block(cfg, *block_axis(cfg, i)) for i in range(cfg.depth))
        self.fusion = nn.Linear(2 * d, d) if cfg.sprint.fusion == "concat_linear" else None
        self.register_buffer("mask_token", torch.randn(1, 1, d) * cfg.sprint.mask_token_std)  # fixed, never trained

    # The three stages are views of `blocks`, so the weights layout is a dense SiT's.
    @property
    def encoder(self) -> nn.ModuleList:
        return self.blocks[: self.config.sprint.encoder_depth]

    @property
    def middle(self) -> nn.ModuleList:
        return self.blocks[self.config.sprint.encoder_depth : self.config.depth - self.config.sprint.decoder_depth]

    @property
    def decoder(self) -> nn.ModuleList:
        return self.blocks[self.config.depth - self.config.sprint.decoder_depth :]

    def sparse_path(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        rope,
        mask: TokenMask | None,
        rows: int,
        taps: list | None = None,
        text=None,
        frames: int = 1,
    ) -> torch.Tensor:
        """Middle blocks on the kept tokens of the first `rows` samples (which cross-attend to every caption token);
        (rows, N, D) with MASK at dropped. rope: the tables of the N tokens, or None."""
        h, c = h[:rows], c[:rows]  # (rows, N, D), (rows, D)
        text = None if text is None else tuple(part[:rows] for part in text)
        if mask is not None:
            ids_keep = mask.ids_keep[:rows]  # (rows, K)
            h = gather_tokens(h, ids_keep)  # (rows, K, D)
            if rope is not None:  # the kept tokens keep the angles of their true positions
                rope = tuple(gather_tokens(table.expand(rows, -1, -1), ids_keep).unsqueeze(1) for table in rope)
        h = self.run_blocks(self.middle, h, c, rope, taps, text=text, frames=frames)
        if mask is not None:
            h = restore_tokens(
                h, TokenMask(ids_keep, mask.ids_restore[:rows], mask.dropped[:rows]), self.mask_token[0, 0]
            )
        return h

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: TokenMask | None = None,
        path_drop: torch.Tensor | None = None,
        middle_rows: int | None = None,
        repa: RepaTap | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) or video (B, C, F, H, W), t: (B,) in [0, 1], y: (B,) labels (num_classes = null) or (B, L)
        caption token ids
        (the empty text = START alone) -> (B, C_out, H, W) (video: (B, C_out, F, H, W)).

        mask: tokens the middle blocks see (None: all). path_drop: (B,) bool, samples whose sparse path
        is replaced by MASK tokens before fusion. middle_rows: only the first `middle_rows` samples run
        the middle blocks, the rest take the path-dropped branch (Path-Drop Guidance's cheap pass).
        repa (training, needs model.repa.depth): a RepaTap that receives the REPA block's projected tokens
        (an argument rather than a second return value: one return type, and DDP's hooks wrap `forward`).
        """
        b = x.shape[0]
        rows = b if middle_rows is None else middle_rows
        if (rows < b or path_drop is not None) and self.fusion is None:
            raise UserError(
                "path drop / Path-Drop Guidance needs model.sprint.fusion 'concat_linear' (fusion 'none' has no dense "
                "path)"
            )
        if repa is not None and (self.repa_projector is None or rows < b):
            raise UserError("the REPA output needs model.repa.depth > 0 and every sample through the middle blocks")
        taps = [] if repa is not None else None
        h, c, text = self.embed(x, t, y)  # (B, N, D), (B, D), caption or None
        rope = self.rope_rows(h.shape[1])
        frames = self.config.token_grid(h.shape[1])[0] if self.config.video else 1  # a shorter clip: fewer
        h = self.run_blocks(self.encoder, h, c, rope, taps, text=text, frames=frames)  # (B, N, D) dense path
        sparse = self.sparse_path(h, c, rope, mask, rows, taps, text, frames) if rows > 0 else h[:0]  # (rows, N, D)
        if rows < b:
            sparse = torch.cat([sparse, self.mask_token.to(h.dtype).expand(b - rows, *h.shape[1:])])  # (B, N, D)
        if path_drop is not None:
            sparse = torch.where(path_drop[:, None, None], self.mask_token.to(sparse.dtype), sparse)
        h = sparse if self.fusion is None else self.fusion(torch.cat([sparse, h], dim=-1))  # (B, N, D)
        h = self.run_blocks(self.decoder, h, c, rope, taps, text=text, frames=frames)
        if repa is not None:
            sparse_tap = mask is not None and len(self.encoder) < self.config.repa.depth <= len(self.encoder) + len(
                self.middle
            )
            repa.projected, repa.ids_keep = self.repa_projector(taps[0]), mask.ids_keep if sparse_tap else None
        return self.head(h, c)  # (B, C_out, H, W)
