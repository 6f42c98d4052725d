"""Token density over the noise level (pure functions): how large SparseDiT's sparse token grid is at each t (video:
per frame), and what share of the tokens SPRINT's middle blocks see at each sampling step (`KeepSchedule`).

A schedule is written as text, the form `model.sparse.grid` and `sprintdit sparsify --sparse-grid` take:

    "8"                 constant: an 8 x 8 sparse grid at every noise level
    "6:10"              the paper's timestep-adaptive schedule from grid 6 (at pure noise) to grid 10,
                        which is held for the last quarter of sampling (t <= 1/4)
    "1=6,0.5=8,0.2=10"  knots t=grid; the pruning rate r is linear in t between knots, flat outside

t is the noise level in [0, 1] (1 = pure noise; DDPM step k of T is t = k / T). With N dense tokens a grid s
keeps M = s^2 tokens, pruning r = 1 - M / N. The paper's rule for t in [1/4, 1] is
r(t) = (4 - 4t)/3 r_min + (4t - 1)/3 r_max, so "a:b" is the knots {1: a, 1/4: b}. Rates between knots are
rounded to the achievable grid whose r is closest.

A SPRINT keep schedule (`sample.middle_keep`) has the same three forms with keep ratios in (0, 1] for grid sides:
"0.25" (constant), "0.25:1" (0.25 at pure noise rising linearly to 1, dense, at t = 1/4 and below) or knots
"1=0.25,0.5=0.5"; 1 everywhere is the dense middle. Ratios between knots round to the nearest one the structured
groups of the schedule's sparsest ratio realise (`masking.keep_levels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, NamedTuple, Optional

import torch

from .errors import UserError

RECOVERS = ("fuse", "residual")
DENSEST_FRACTION = 0.25  # "a:b" holds the densest grid for t below this (the last quarter of sampling)


@dataclass
class SparseConfig:
    """SparseDiT's layout (used with model.arch 'sparsedit'); the top dense depth is what the rest leaves."""

    grid: str = "6:10"  # sparse grid schedule: constant "8", "min:max", or knots "1=6,0.5=8,0.2=10"
    pool_depth: int = 2  # Poolingformer blocks at the bottom (all tokens, attention = mean of V)
    modules: int = 4  # sparse-dense token modules (SDTM)
    sparse_depth: int = 3  # per module: ordinary blocks on the sparse tokens (after the merge block)
    dense_depth: int = 1  # per module: ordinary blocks on all tokens (after the recover block)
    # video: frames of the sparse grid (pools time too; default: every frame of the token grid)
    frames: Optional[int] = None
    readd_pos: bool = False  # add the sin-cos positions again to pooled tokens and to recovered tokens (sincos models)
    # fuse: W1 up(s) + W2 h, W1 = 0, W2 = I (the paper) | residual: h + up(what the module's sparse blocks added)
    recover: str = "fuse"

    @property
    def module_depth(self) -> int:
        return 1 + self.sparse_depth + 1 + self.dense_depth  # merge, sparse, recover, dense


@dataclass(frozen=True)
class DensitySchedule:
    knots: tuple[tuple[float, int], ...]  # (t, grid side) sorted by t

    @property
    def sides(self) -> tuple[int, int]:
        """(smallest, largest) grid side the schedule reaches."""
        grids = [g for _, g in self.knots]
        return min(grids), max(grids)


def parse_knots(text: str, value: Callable[[str], float]) -> tuple[tuple[float, float], ...]:
    """(t, value) knots sorted by t of a schedule text: "v" (constant), "a:b" (a at t = 1, b for t <= 1/4) or knots
    "t=v,..."; `value` reads one value. Raises ValueError for text of none of these forms."""
    if "=" in text:
        return tuple(sorted((float(t), value(v)) for t, v in (item.split("=") for item in text.split(","))))
    if ":" in text:
        start, end = (value(v) for v in text.split(":"))
        return ((DENSEST_FRACTION, end), (1.0, start))
    return ((1.0, value(text)),)


def check_knots(knots: tuple[tuple[float, float], ...], text: str, what: str) -> None:
    """Knot times in [0, 1], one value per time."""
    if any(not 0.0 <= t <= 1.0 for t, _ in knots):
        raise UserError(f"{what} {text!r}: knot times must be in [0, 1]")
    if len({t for t, _ in knots}) != len(knots):
        raise UserError(f"{what} {text!r} gives two values for the same t")


def interpolate(knots: tuple[tuple[float, float], ...], t: float) -> float:
    """The value at t of knots (t, value) sorted by t: linear between knots, flat outside them."""
    (t0, v0), rest = knots[0], knots[1:]
    if t <= t0 or not rest:
        return v0 if t <= t0 else knots[-1][1]
    for (ta, va), (tb, vb) in zip(knots, rest):
        if t <= tb:
            w = (t - ta) / (tb - ta)
            return (1 - w) * va + w * vb
    return knots[-1][1]


def parse_schedule(text: str) -> DensitySchedule:
    """The schedule a `model.sparse.grid` string describes (see the module docstring)."""
    text = str(text).strip()
    try:
        knots = parse_knots(text, int)
    except ValueError:
        raise UserError(
            f"sparse grid schedule {text!r} is not '8', 'min:max' (e.g. 6:10) or knots 't=grid,...' (e.g. "
            f"1=6,0.5=8,0.2=10)"
        ) from None
    if any(g < 1 for _, g in knots):
        raise UserError(f"sparse grid schedule {text!r}: grid sides must be >= 1")
    check_knots(knots, text, "sparse grid schedule")
    return DensitySchedule(knots)


def check_schedule(schedule: DensitySchedule, dense_grid: tuple[int, ...]) -> None:
    """The schedule's sides fit the (per-frame) token grid (rows, columns)."""
    if schedule.sides[1] > min(dense_grid[-2:]):
        raise UserError(
            f"sparse grid {schedule.sides[1]} exceeds the {'x'.join(map(str, dense_grid[-2:]))} token grid (per frame)"
        )


def pruning_rate(side: int, dense_tokens: int) -> float:
    return 1.0 - side * side / dense_tokens


def rate_at(schedule: DensitySchedule, t: float, dense_tokens: int) -> float:
    """Pruning rate r at noise level t: linear in t between knots, flat outside them."""
    return interpolate(tuple((tk, pruning_rate(g, dense_tokens)) for tk, g in schedule.knots), t)


def side_at(schedule: DensitySchedule, t: float, dense_tokens: int) -> int:
    """The grid side whose pruning rate is closest to r(t) (ties: the denser grid), within the schedule's range."""
    kept = (1.0 - rate_at(schedule, t, dense_tokens)) * dense_tokens
    lo, hi = schedule.sides
    return min(range(lo, hi + 1), key=lambda s: (abs(s * s - kept), -s))


def sides_for(schedule: DensitySchedule, t: torch.Tensor, dense_tokens: int) -> list[int]:
    """Grid side per sample for noise levels t (B,)."""
    return [side_at(schedule, v, dense_tokens) for v in t.detach().double().cpu().tolist()]


INTERVAL_PROBES = 1024  # side_intervals: evenly spaced noise levels probed before each edge is bisected
BISECTIONS = 52  # halvings of an edge's bracket: float64 precision on [0, 1]
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # frac(n GOLDEN), n = 0, 1, ...: the most evenly spread sequence in [0, 1)


def side_intervals(schedule: DensitySchedule, dense_tokens: int) -> list[tuple[float, float, int]]:
    """(t_lo, t_hi, side) for the intervals of [0, 1], in order of t, on which the schedule's grid side is constant:
    the strata that gated training draws t from. Each edge is found between two probes and bisected."""
    side = lambda t: side_at(schedule, t, dense_tokens)
    probes = [i / INTERVAL_PROBES for i in range(INTERVAL_PROBES + 1)]
    edges = []
    for a, b in zip(probes, probes[1:]):
        if side(a) != side(b):
            lo, hi = a, b
            for _ in range(BISECTIONS):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if side(mid) == side(a) else (lo, mid)
            edges.append(hi)
    bounds = [0.0, *edges, 1.0]
    return [(lo, hi, side((lo + hi) / 2)) for lo, hi in zip(bounds, bounds[1:])]


class Gate(NamedTuple):
    """One stratum of gated SparseDiT training: t drawn with P(T <= t) in [lo, hi), all on one grid side."""

    lo: float
    hi: float
    side: int

    def arguments(self) -> dict:
        """The objective's and the model's keyword arguments for a micro-batch of this stratum."""
        return {"t_cdf": (self.lo, self.hi), "side": self.side}


def time_gates(grid: str, dense_tokens: int, time_cdf: Callable[[float], float]) -> list[Gate]:
    """The strata of train.sparse_gating: the t intervals on which the schedule `grid` keeps one side, in the CDF of
    the training distribution of t. The paper's gating gives each data-parallel rank a t sub-interval; here each
    micro-batch gets one, so any world size trains on the same draws. Taking stratum k with probability hi - lo and
    drawing t inside it leaves the distribution of t unchanged."""
    gates = [
        Gate(time_cdf(lo), time_cdf(hi), side) for lo, hi, side in side_intervals(parse_schedule(grid), dense_tokens)
    ]
    return [g for g in gates if g.hi > g.lo]


def gate_at(gates: list[Gate], micro_batch: int) -> Gate:
    """The stratum of global micro-batch `micro_batch` (step x grad_accum + index): the one holding frac(n GOLDEN), so
    over n the strata come up in proportion to their widths, evenly spread, from n alone (no random number, no
    device sync, the same on every rank)."""
    u = (micro_batch * GOLDEN) % 1.0
    return gates[sum(u >= g.hi for g in gates[:-1])]


def pooled_centres(side: int, size: int) -> torch.Tensor:
    """Centre of each of `side` adaptive-pooling cells over `size` positions, in dense-grid units (side,).

    Cell i covers [floor(i size / side), ceil((i + 1) size / side)); when side == size this is 0, 1, ...
    """
    starts = [math.floor(i * size / side) for i in range(side)]
    ends = [math.ceil((i + 1) * size / side) for i in range(side)]
    return torch.tensor([(a + b - 1) / 2 for a, b in zip(starts, ends)], dtype=torch.float64)


# ----------------------------------------------------------------------------------- SPRINT's keep ratio in sampling


@dataclass(frozen=True)
class KeepSchedule:
    knots: tuple[tuple[float, float], ...]  # (t, share of the tokens the middle blocks see) sorted by t

    @property
    def sparsest(self) -> float:
        return min(keep for _, keep in self.knots)

    @property
    def dense(self) -> bool:
        return self.sparsest == 1.0


def parse_keep(text: str) -> KeepSchedule:
    """The keep schedule a `sample.middle_keep` string describes (see the module docstring)."""
    text = str(text).strip()
    try:
        knots = parse_knots(text, float)
    except ValueError:
        raise UserError(
            f"middle keep schedule {text!r} is not a ratio '0.25', 'min:final' (e.g. 0.25:1) or knots 't=keep,...' "
            f"(e.g. 1=0.25,0.5=0.5,0=1)"
        ) from None
    if any(not 0.0 < keep <= 1.0 for _, keep in knots):
        raise UserError(f"middle keep schedule {text!r}: keep ratios must be in (0, 1] (1: every token)")
    check_knots(knots, text, "middle keep schedule")
    return KeepSchedule(knots)


def keep_at(schedule: KeepSchedule, t: float, levels: list[Fraction]) -> Fraction:
    """The keep ratio at noise level t: the schedule's value there, rounded to the nearest of `levels` (ties: the
    denser)."""
    wanted = interpolate(schedule.knots, t)
    return min(levels, key=lambda level: (abs(level - wanted), -level))
