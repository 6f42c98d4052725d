"""Token masks: which tokens the sparse (deep) path keeps, as one value and small pure functions.

A `TokenMask` describes, per sample, the kept token ids (in raster order), the permutation that
restores the full sequence, and a bool mask (True = dropped). `make_mask` builds one from a ratio and a
type; `gather_tokens` applies it; `restore_tokens` undoes it, filling dropped positions.

Structured masks split the token grid into g x g groups and keep k tokens per group (ratio 1 - k/g^2),
with the group lattice shifted by a random offset per sample (groups wrap around the grid edges). On a video's
(frames, rows, columns) grid the groups are g_t x g x g, g_t the largest divisor of the frames up to g (space-time
groups as cubic as the grid allows; g_t = 1 for one frame, which is then the image mask draw for draw), and the
lattice is offset in time as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import UserError

MASK_TYPES = ("random", "structured")
# A requested ratio matches an achievable one if they differ by less than this (floats from YAML).
RATIO_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TokenMask:
    ids_keep: torch.Tensor  # (B, K) int64, kept token ids in increasing order
    ids_restore: torch.Tensor  # (B, N) int64: position of token n in cat([kept, dropped])
    dropped: torch.Tensor  # (B, N) bool, True where the token is dropped

    @property
    def num_kept(self) -> int:
        return self.ids_keep.shape[1]

    def to(self, device: torch.device | str) -> "TokenMask":
        return TokenMask(self.ids_keep.to(device), self.ids_restore.to(device), self.dropped.to(device))

    def rows(self, start: int, stop: int) -> "TokenMask":
        """The mask of samples start..stop-1 (e.g. one rank's block of a mask drawn for all ranks)."""
        return TokenMask(self.ids_keep[start:stop], self.ids_restore[start:stop], self.dropped[start:stop])


def mask_from_dropped(dropped: torch.Tensor) -> TokenMask:
    """Build the mask value from a (B, N) bool tensor with the same number of kept tokens per row."""
    kept_per_row = (~dropped).sum(1)
    num_kept = int(kept_per_row[0])
    if not bool((kept_per_row == num_kept).all()):
        raise ValueError("every sample must keep the same number of tokens")
    order = torch.argsort(dropped.to(torch.int8), dim=1, stable=True)  # kept first, each part in raster order
    return TokenMask(order[:, :num_kept], torch.argsort(order, dim=1), dropped)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def group_shape(g: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """A structured mask's group for spatial side g: (g, g), or on a video grid (g_t, g, g) with g_t the largest
    divisor of the frames that is <= g."""
    return tuple(max(d for d in _divisors(grid[0]) if d <= g) for _ in range(len(grid) == 3)) + (g, g)


def achievable_structured_ratios(grid: tuple[int, ...], max_group: int | None = None) -> list[Fraction]:
    """Every drop ratio 1 - k/|group| (1 <= k <= |group|) with the side g dividing both spatial grid sides (g <=
    max_group)."""
    sizes = [
        math.prod(group_shape(g, grid)) for g in _divisors(math.gcd(*grid[-2:])) if max_group is None or g <= max_group
    ]
    return sorted({1 - Fraction(k, size) for size in sizes for k in range(1, size + 1)})


def structured_group(ratio: float, grid: tuple[int, ...]) -> tuple[int, int]:
    """The smallest spatial group side g (dividing both spatial grid sides) and the keep count k per group
    (`group_shape(g, grid)`) with 1 - k/|group| == ratio."""
    for g in _divisors(math.gcd(*grid[-2:])):
        size = math.prod(group_shape(g, grid))
        k = (1.0 - ratio) * size
        if abs(k - round(k)) < RATIO_TOLERANCE * size and 1 <= round(k) <= size:
            return g, round(k)
    shown = ", ".join(f"{float(r):g}" for r in achievable_structured_ratios(grid, max_group=4))
    groups = "groups up to 4x4" + (" (x up to 4 frames)" if len(grid) == 3 else "")
    raise UserError(
        f"structured mask ratio {ratio:g} is not achievable on a {'x'.join(map(str, grid))} token grid; "
        f"achievable with {groups}: {shown} (larger groups dividing the grid add finer ratios)"
    )


def num_kept_random(ratio: float, num_tokens: int) -> int:
    keep = round(num_tokens * (1.0 - ratio))
    if not 0.0 <= ratio < 1.0 or keep < 1:
        raise UserError(
            f"mask ratio {ratio:g} keeps no token of {num_tokens}; use a ratio in [0, {1 - 1 / num_tokens:g}]"
        )
    return keep


def check_mask_ratio(ratio: float, mask_type: str, grid: tuple[int, int]) -> None:
    """Raise a UserError if `ratio` cannot be realised by `mask_type` on `grid`."""
    if mask_type not in MASK_TYPES:
        raise UserError(f"unknown mask type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    if mask_type == "random":
        num_kept_random(ratio, math.prod(grid))
    else:
        structured_group(ratio, grid)


def generator_device(generator: torch.Generator | None) -> torch.device | None:
    """The device a draw from `generator` is made on (None: torch's default generator, the default device)."""
    return None if generator is None else generator.device


def random_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None) -> TokenMask:
    """Keep round(N (1 - ratio)) tokens chosen uniformly at random, independently per sample."""
    n = math.prod(grid)
    keep = num_kept_random(ratio, n)
    scores = torch.rand(batch, n, generator=generator, device=generator_device(generator))  # (B, N)
    ranks = torch.argsort(torch.argsort(scores, dim=1), dim=1)
    return mask_from_dropped(ranks >= keep)


def lattice_layout(group_dropped: torch.Tensor, group: tuple[int, ...], offset: torch.Tensor) -> torch.Tensor:
    """Place per-group drop patterns on the grid. group_dropped (B, n_0/g_0, n_1/g_1, ..., |group|) bool: which of
    each group's tokens (raster order inside the group) are dropped; offset (B, d) shifts the lattice along each
    axis (wrapping around). -> dropped (B, N) over the grid in raster order."""
    b, *counts, _ = group_dropped.shape
    d = len(group)
    grid = [c * g for c, g in zip(counts, group)]
    layout = (
        group_dropped.view(b, *counts, *group)
        .permute(0, *[v for i in range(d) for v in (1 + i, 1 + d + i)])
        .reshape(b, -1)
    )
    source = torch.zeros(b, *[1] * d, dtype=torch.long, device=offset.device)  # (B, 1, ..., 1)
    for axis, n in enumerate(grid):  # the unshifted position each token of the shifted lattice reads
        index = (torch.arange(n, device=offset.device) - offset[:, axis : axis + 1]) % n  # (B, n)
        source = source * n + index.view(b, *[n if a == axis else 1 for a in range(d)])
    return torch.gather(layout, 1, source.reshape(b, -1))


def structured_mask(
    batch: int, grid: tuple[int, ...], ratio: float, generator: torch.Generator | None = None
) -> TokenMask:
    """Keep k random tokens in every group (g x g, or g_t x g x g on a video grid); the group lattice is offset at
    random per sample."""
    g, k = structured_group(ratio, grid)
    group = group_shape(g, grid)
    device = generator_device(generator)
    scores = torch.rand(
        batch, *[n // s for n, s in zip(grid, group)], math.prod(group), generator=generator, device=device
    )  # (B, groups..., |group|)
    ranks = torch.argsort(torch.argsort(scores, dim=-1), dim=-1)
    offset = torch.randint(0, g, (batch, 2), generator=generator, device=device)  # (B, 2) lattice shift (rows, cols)
    if len(grid) == 3:  # drawn after the spatial shift, and only when it can move: one frame stays the image mask
        shift_t = (
            torch.randint(0, group[0], (batch, 1), generator=generator, device=device)
            if group[0] > 1
            else offset[:, :1] * 0
        )
        offset = torch.cat([shift_t, offset], dim=1)  # (B, 3)
    return mask_from_dropped(lattice_layout(ranks >= k, group, offset))


def keep_levels(grid: tuple[int, ...], sparsest: float) -> list[Fraction]:
    """The keep ratios k / |group| (k = 1 .. |group|) of the structured group that keeps `sparsest` of the tokens (keep
    1/4: the 2 x 2 group, so 1/4, 1/2, 3/4, 1): what a sampling keep schedule rounds to, denser steps keeping more
    tokens of a group."""
    g, _ = structured_group(1.0 - sparsest, grid)
    size = math.prod(group_shape(g, grid))
    return [Fraction(k, size) for k in range(1, size + 1)]


def shared_mask(batch: int, grid: tuple[int, ...], keep: float, seed: int) -> TokenMask | None:
    """One structured mask keeping `keep` of the tokens, drawn from `seed`, for every sample of a batch (so no sample's
    tokens depend on its batch-mates); None for keep 1."""
    if keep == 1:
        return None
    one = structured_mask(1, grid, 1.0 - keep, torch.Generator().manual_seed(seed))  # (1, K), (1, N), (1, N)
    return TokenMask(one.ids_keep.expand(batch, -1), one.ids_restore.expand(batch, -1), one.dropped.expand(batch, -1))


def make_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    mask_type: str,
    generator: torch.Generator | None = None,
    tiles: int = 1,
) -> TokenMask | None:
    """A fresh mask for a batch, or None for ratio 0 (the dense model). tiles: the mask of `grid` repeated over that
    many frames (ModelConfig.mask_grid: the factorised video layout keeps the same positions in every frame)."""
    check_mask_ratio(ratio, mask_type, grid)
    if ratio == 0:
        return None
    mask = (random_mask if mask_type == "random" else structured_mask)(batch, grid, ratio, generator)
    return mask if tiles == 1 else mask_from_dropped(mask.dropped.repeat(1, tiles))  # (B, tiles N), frame-major


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), ids: (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(kept: torch.Tensor, mask: TokenMask, fill: torch.Tensor) -> torch.Tensor:
    """kept: (B, K, C) -> (B, N, C) with kept tokens at their positions and `fill` (C,) at dropped ones."""
    b, k, c = kept.shape
    n = mask.ids_restore.shape[1]
    filler = fill.to(kept.dtype).expand(b, n - k, c)
    return gather_tokens(torch.cat([kept, filler], dim=1), mask.ids_restore)
