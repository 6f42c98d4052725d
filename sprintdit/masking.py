"""Token masks: which tokens the sparse (deep) path keeps, as one value and small pure functions.

A `TokenMask` describes, per sample, the kept token ids (in raster order), the permutation that
restores the full sequence, and a bool mask (True = dropped). `make_mask` builds one from a ratio and a
type; `gather_tokens` applies it; `restore_tokens` undoes it, filling dropped positions.

Structured masks split the token grid into g x g groups and keep k tokens per group (ratio 1 - k/g^2),
with the group lattice shifted by a random offset per sample (groups wrap around the grid edges).
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


def achievable_structured_ratios(grid: tuple[int, int], max_group: int | None = None) -> list[Fraction]:
    """Every drop ratio 1 - k/g^2 (1 <= k <= g^2) with g dividing both grid sides (g <= max_group)."""
    groups = [g for g in _divisors(math.gcd(*grid)) if max_group is None or g <= max_group]
    return sorted({1 - Fraction(k, g * g) for g in groups for k in range(1, g * g + 1)})


def structured_group(ratio: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The smallest group size g (dividing both grid sides) and keep count k with 1 - k/g^2 == ratio."""
    for g in _divisors(math.gcd(*grid)):
        k = (1.0 - ratio) * g * g
        if abs(k - round(k)) < RATIO_TOLERANCE * g * g and 1 <= round(k) <= g * g:
            return g, round(k)
    shown = ", ".join(f"{float(r):g}" for r in achievable_structured_ratios(grid, max_group=4))
    raise UserError(
        f"structured mask ratio {ratio:g} is not achievable on a {grid[0]}x{grid[1]} token grid; "
        f"achievable with groups up to 4x4: {shown} (larger groups dividing the grid add finer ratios)"
    )


def num_kept_random(ratio: float, num_tokens: int) -> int:
    keep = round(num_tokens * (1.0 - ratio))
    if not 0.0 <= ratio < 1.0 or keep < 1:
        raise UserError(f"mask ratio {ratio:g} keeps no token of {num_tokens}; use a ratio in [0, {1 - 1 / num_tokens:g}]")
    return keep


def check_mask_ratio(ratio: float, mask_type: str, grid: tuple[int, int]) -> None:
    """Raise a UserError if `ratio` cannot be realised by `mask_type` on `grid`."""
    if mask_type not in MASK_TYPES:
        raise UserError(f"unknown mask type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    if mask_type == "random":
        num_kept_random(ratio, grid[0] * grid[1])
    else:
        structured_group(ratio, grid)


def generator_device(generator: torch.Generator | None) -> torch.device | None:
    """The device a draw from `generator` is made on (None: torch's default generator, the default device)."""
    return None if generator is None else generator.device


def random_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None) -> TokenMask:
    """Keep round(N (1 - ratio)) tokens chosen uniformly at random, independently per sample."""
    n = grid[0] * grid[1]
    keep = num_kept_random(ratio, n)
    scores = torch.rand(batch, n, generator=generator, device=generator_device(generator))  # (B, N)
    ranks = torch.argsort(torch.argsort(scores, dim=1), dim=1)
    return mask_from_dropped(ranks >= keep)


def structured_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None) -> TokenMask:
    """Keep k random tokens in every g x g group; the group lattice is offset at random per sample."""
    g, k = structured_group(ratio, grid)
    h, w = grid
    gh, gw = h // g, w // g
    device = generator_device(generator)
    scores = torch.rand(batch, gh, gw, g * g, generator=generator, device=device)  # (B, gh, gw, g*g)
    ranks = torch.argsort(torch.argsort(scores, dim=-1), dim=-1)
    dropped = (ranks >= k).view(batch, gh, gw, g, g).permute(0, 1, 3, 2, 4).reshape(batch, h, w)
    offset = torch.randint(0, g, (batch, 2), generator=generator, device=device)  # (B, 2) lattice shift (rows, cols)
    rows = (torch.arange(h, device=offset.device) - offset[:, :1]) % h  # (B, h) source row of each row after the shift
    cols = (torch.arange(w, device=offset.device) - offset[:, 1:]) % w  # (B, w)
    source = (rows[:, :, None] * w + cols[:, None, :]).reshape(batch, h * w)
    return mask_from_dropped(torch.gather(dropped.reshape(batch, h * w), 1, source))


def make_mask(
    batch: int, grid: tuple[int, int], ratio: float, mask_type: str, generator: torch.Generator | None = None
) -> TokenMask | None:
    """A fresh mask for a batch, or None for ratio 0 (the dense model)."""
    check_mask_ratio(ratio, mask_type, grid)
    if ratio == 0:
        return None
    return (random_mask if mask_type == "random" else structured_mask)(batch, grid, ratio, generator)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), ids: (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(kept: torch.Tensor, mask: TokenMask, fill: torch.Tensor) -> torch.Tensor:
    """kept: (B, K, C) -> (B, N, C) with kept tokens at their positions and `fill` (C,) at dropped ones."""
    b, k, c = kept.shape
    n = mask.ids_restore.shape[1]
    filler = fill.to(kept.dtype).expand(b, n - k, c)
    return gather_tokens(torch.cat([kept, filler], dim=1), mask.ids_restore)
