"""SparseDiT: a DiT/SiT whose middle runs on a small pooled token grid, built from a pretrained dense model.

    x -> embed -> Poolingformer blocks (all tokens; attention = token mean of V)
      -> modules x [ s = adaptive-avg-pool(h) to a side x side grid             (B, side^2, D)
                     merge:   s attends to h (cross-attention), MLP
                     sparse:  ordinary blocks on s
                     recover: m = W1 nearest-upsample(s) + W2 h (W1 = 0, W2 = I at init); m attends to s, MLP
                              (model.sparse.recover residual: m = W2 h + W1 upsample(s - pooled), W1 = W2 = I)
                     dense:   ordinary blocks on m ]
      -> top dense blocks -> final layer

Blocks keep the dense model's indices (block i inherits the pretrained block i), so `sparsify_state_dict`
is a rename plus: Poolingformers keep only the V rows of qkv, and each recover block gets W1/W2.
The grid side follows the noise level t of each sample through `model.sparse.grid` (`sprintdit.density`).
Samples of one batch with different sides run the modules in groups, one per side. The paper's "gating" gives
each data-parallel rank a t sub-interval instead; `train.sparse_gating` gives each micro-batch one stratum of t
(sprintdit.density.time_gates), and the trainer passes its `side`: one grid per forward, no per-sample choice.
With RoPE, pooled tokens take the centre of their pooling cell as (fractional) position; with sin-cos
positions, `model.sparse.readd_pos` adds them again to the pooled tokens (at the cell centres) and to the
recovered dense tokens (the release adds them at the input only, the default here).
Video: the sparse grid pools space to side x side in every frame, and time too with `model.sparse.frames`; the
schedule's pruning rate is the per-frame one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..density import check_schedule, parse_schedule, pooled_centres, side_at, sides_for
from ..errors import UserError
from .sit import Backbone, Block, ModelConfig, axis_channels, block_axis, rope_at, sincos_at


class PoolingAttention(nn.Module):
    """Attention replaced by global average pooling of V: proj(mean_n V x_n), the same for every token.

    The mean is taken before V (V is affine, so mean(V x) = V mean(x)): O(N D) instead of an N x N matrix.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *positions_unused) -> torch.Tensor:  # (B, N, D) -> (B, 1, D)
        return self.proj(self.v(x.mean(dim=1, keepdim=True)))  # (B, 1, D), broadcast over tokens


class PoolingBlock(Block):
    """A Poolingformer: the block with attention replaced by the mean of V over what it attends over (all tokens; on
    the factorised video layout a frame's tokens, or a position's frames)."""

    def __init__(self, cfg: ModelConfig, axis: str = "joint", adds_frames: bool = False):
        super().__init__(cfg, axis, adds_frames)
        self.attn = PoolingAttention(cfg.hidden_size)


class Recover(nn.Module):
    """merged = W1 up + W2 dense. fuse (the paper): up is the upsampled sparse tokens, W1 = 0 and W2 = I at init, so
    the dense path starts as identity and the sparse blocks' work reaches it only through the recover block's
    cross-attention. residual: up is the upsampled change the merge and sparse blocks made to the pooled tokens,
    W1 = W2 = I at init, so the dense tokens start with that change added (at the full grid: the dense model)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim)

    def reset(self) -> None:
        (nn.init.eye_ if self.mode == "residual" else nn.init.zeros_)(self.w1.weight)
        nn.init.eye_(self.w2.weight)
        nn.init.zeros_(self.w1.bias)
        nn.init.zeros_(self.w2.bias)

    def forward(self, up: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.w1(up) + self.w2(dense)


def sparse_shape(cfg: ModelConfig, side: int) -> tuple[int, ...]:
    """The sparse token grid at grid side `side`: (side, side), or for video (frames, side, side) with
    model.sparse.frames (default: every frame of the token grid)."""
    return ((cfg.sparse.frames or cfg.grid[0]),) * cfg.video + (side, side)


def pool_tokens(h: torch.Tensor, grid: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, prod(grid), D) -> (B, prod(shape), D): adaptive average pooling of the token grid (2D or 3D)."""
    img = h.transpose(1, 2).unflatten(2, grid)  # (B, D, H, W) or (B, D, F, H, W)
    if (
        len(grid) == 3 and shape[0] == grid[0]
    ):  # time kept: each frame pooled as an image (one frame: the image model exactly)
        return (
            F.adaptive_avg_pool2d(img.flatten(1, 2), shape[1:]).unflatten(1, (-1, grid[0])).flatten(2).transpose(1, 2)
        )
    pool = F.adaptive_avg_pool3d if len(grid) == 3 else F.adaptive_avg_pool2d
    return pool(img, shape).flatten(2).transpose(1, 2)


def upsample_tokens(s: torch.Tensor, shape: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """(B, prod(shape), D) -> (B, prod(grid), D): nearest-neighbour upsampling of the sparse grid."""
    img = s.transpose(1, 2).unflatten(2, shape)  # (B, D, *shape)
    return F.interpolate(img, size=grid, mode="nearest-exact").flatten(2).transpose(1, 2)


class SparseDiT(Backbone):
    def build_body(self, cfg: ModelConfig) -> None:
        sp = cfg.sparse
        self.schedule = parse_schedule(sp.grid)
        kinds = self.block_kinds(cfg)
        self.blocks = nn.ModuleList(
            (PoolingBlock if kind == "pool" else Block)(cfg, *block_axis(cfg, i)) for i, kind in enumerate(kinds)
        )
        self.recovers = nn.ModuleList(Recover(cfg.hidden_size, sp.recover) for _ in range(sp.modules))

    @staticmethod
    def block_kinds(cfg: ModelConfig) -> list[str]:
        """The role of every block index: pool, merge, sparse, recover, dense (in modules) or top."""
        sp = cfg.sparse
        module = ["merge"] + ["sparse"] * sp.sparse_depth + ["recover"] + ["dense"] * sp.dense_depth
        kinds = ["pool"] * sp.pool_depth + module * sp.modules
        return kinds + ["top"] * (cfg.depth - len(kinds))

    def initialize_weights(self) -> None:
        super().initialize_weights()
        for recover in self.recovers:
            recover.reset()

    @property
    def fusion(self) -> None:  # no SPRINT dense path: Path-Drop Guidance does not apply
        return None

    def cell_centres(self, side: int) -> list[torch.Tensor]:
        """Per axis, the dense-grid positions of the sparse grid's pooling-cell centres."""
        return [pooled_centres(n, size) for n, size in zip(sparse_shape(self.config, side), self.config.grid)]

    def sparse_rope(self, side: int, device: torch.device):
        cfg = self.config
        if cfg.pos_embed != "rope":
            return None
        cos, sin = rope_at(
            self.cell_centres(side), axis_channels(cfg.hidden_size // cfg.num_heads, cfg.grid), cfg.rope_theta
        )
        return cos.to(device), sin.to(device)

    def sparse_pos(self, side: int, like: torch.Tensor) -> torch.Tensor | float:
        """Sin-cos positions of the pooled cells' centres (1, M, D) when re-adding positions, else 0."""
        cfg = self.config
        if not cfg.sparse.readd_pos:
            return 0.0
        return sincos_at(self.cell_centres(side), axis_channels(cfg.hidden_size, cfg.grid)).to(like).unsqueeze(0)

    def modules_at(self, h: torch.Tensor, c: torch.Tensor, side: int, text=None) -> torch.Tensor:
        """The sparse-dense token modules on (B, N, D) tokens that all use a side x side sparse grid; `text`: the
        caption (tokens, keep) of a text model, cross-attended by every block, sparse and dense."""
        sp, grid, shape = self.config.sparse, self.config.grid, sparse_shape(self.config, side)
        dense_rope, sparse_rope = self.rope, self.sparse_rope(side, h.device)
        per_block = {"text": text, "frames": grid[0] if self.config.video else 1}  # what every block takes
        for m, recover in enumerate(self.recovers):
            start = sp.pool_depth + m * sp.module_depth
            merge, *sparse, recover_block = self.blocks[start : start + sp.sparse_depth + 2]
            dense = self.blocks[start + sp.sparse_depth + 2 : start + sp.module_depth]
            pooled = pool_tokens(h, grid, shape) + self.sparse_pos(side, h)  # (B, M, D), M = prod(shape)
            s = self.run_blocks([merge], pooled, c, sparse_rope, context=h, context_rope=dense_rope, **per_block)
            s = self.run_blocks(sparse, s, c, sparse_rope, **per_block)
            m = recover(upsample_tokens(s - pooled if sp.recover == "residual" else s, shape, grid), h)  # (B, N, D)
            if sp.readd_pos:
                m = m + self.pos_embed
            h = self.run_blocks([recover_block], m, c, dense_rope, context=s, context_rope=sparse_rope, **per_block)
            h = self.run_blocks(dense, h, c, dense_rope, **per_block)
        return h

    def use_grid(self, grid: str) -> None:
        """Sample with another density schedule: pooling and upsampling have no weights, so a SparseDiT runs at any
        grid that fits its token grid (quality follows what it was fine-tuned on)."""
        schedule = parse_schedule(grid)
        check_schedule(schedule, self.config.grid)
        self.schedule = schedule
        self.config.sparse.grid = grid

    def step_options(self, t: float) -> dict:
        return {"side": side_at(self.schedule, t, self.config.frame_tokens)}

    def sides(self, t: torch.Tensor) -> list[int]:
        """Sparse grid side per sample at noise levels t (B,)."""
        return sides_for(self.schedule, t, self.config.frame_tokens)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, side: int | None = None, **sprint_only
    ) -> torch.Tensor:
        """x: (B, C, H, W) or (B, C, F, H, W), t: (B,) noise level in [0, 1], y: (B,) labels or captions -> (B, C_out,
        ...).

        side: one sparse grid side for the whole batch (default: each sample's from the density schedule).
        """
        if any(v is not None for v in sprint_only.values()):
            raise UserError(
                f"SparseDiT takes no {', '.join(k for k, v in sprint_only.items() if v is not None)} (SPRINT masks / "
                f"path drop)"
            )
        cfg = self.config
        h, c, text = self.embed(x, t, y)  # (B, N, D), (B, D), the caption (tokens, keep) or None
        frames = cfg.token_grid(h.shape[1])[0] if cfg.video else 1
        h = self.run_blocks(self.blocks[: cfg.sparse.pool_depth], h, c, None, text=text, frames=frames)
        sides = [side] * x.shape[0] if side is not None else self.sides(t)
        if len(set(sides)) == 1:
            h = self.modules_at(h, c, sides[0], text)
        else:  # one group per grid side
            out = torch.empty_like(h)
            for s in sorted(set(sides)):
                rows = torch.tensor([i for i, v in enumerate(sides) if v == s], device=h.device)
                out[rows] = self.modules_at(
                    h[rows], c[rows], s, None if text is None else tuple(part[rows] for part in text)
                )
            h = out
        top = cfg.sparse.pool_depth + cfg.sparse.modules * cfg.sparse.module_depth
        h = self.run_blocks(self.blocks[top:], h, c, self.rope, text=text, frames=frames)
        return self.head(h, c)  # (B, C_out, H, W)


def sparsify_state_dict(dense: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A dense SiT/DiT state dict (our layout) -> SparseDiT's for `cfg` (arch sparsedit, same sizes).

    Block i inherits block i. Poolingformers keep the V rows of qkv (and drop q/k norms); recover fusions
    start as `Recover.reset` sets them (fuse: W1 = 0, W2 = I; residual: W1 = W2 = I). Nothing else changes.
    """
    d = cfg.hidden_size
    kinds = SparseDiT.block_kinds(cfg)
    out = {}
    for key, value in dense.items():
        if key == "mask_token" or key.startswith("fusion."):
            continue  # SPRINT-only parts (a dense model has no fusion; the MASK buffer is unused)
        parts = key.split(".")
        if parts[0] == "blocks" and kinds[int(parts[1])] == "pool" and parts[2] == "attn":
            if parts[3] == "qkv":
                out[".".join(parts[:3] + ["v", parts[4]])] = value[2 * d :].clone()
            elif parts[3] == "proj":
                out[key] = value
            continue  # q_norm / k_norm: Poolingformers have no queries or keys
        out[key] = value
    for m in range(cfg.sparse.modules):
        recover = Recover(d, cfg.sparse.recover)
        recover.reset()
        out.update({f"recovers.{m}.{k}": v for k, v in recover.state_dict().items()})
    return out
