"""Improved precision and recall (Kynkaanniemi et al. 2019), with density and coverage (Naeem et al.
2020) from the same distances.

Each set of features approximates its manifold by the union of balls around its points, a ball's
radius being the distance to the point's k-th nearest neighbour in its own set. Precision is the
fraction of generated points inside the real manifold, recall the fraction of real points inside the
generated one. Density counts how many real balls hold each generated point (divided by k; about 1 when
the two sets match), coverage is the fraction of real balls holding at least one generated point.

Distances are computed a block of rows at a time, so memory is O(batch_size * N), never O(N^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

DEFAULT_K = 3
DEFAULT_BATCH_SIZE = 1024  # rows of a distance block: batch_size * N float32 values at a time


@dataclass(frozen=True)
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float


def _check(features: torch.Tensor, name: str, k: int) -> torch.Tensor:
    if features.ndim != 2:
        raise UserError(f"{name} features must be (N, D), got shape {tuple(features.shape)}")
    if len(features) <= k:
        raise UserError(f"{name} features: {len(features)} samples, but k = {k} nearest neighbours need more than k")
    return features.float()


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """(N,) distance from each of features (N, D) to its k-th nearest neighbour among the others."""
    radii = []
    for block in features.split(batch_size):
        dist = torch.cdist(block, features)  # (B, N), the point itself at distance ~0
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # skip the point itself
    return torch.cat(radii)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K, batch_size: int = DEFAULT_BATCH_SIZE) -> PRDC:
    """Precision, recall, density and coverage of fake features (M, D) against real features (N, D)."""
    if k < 1 or batch_size < 1:
        raise UserError(f"k and batch_size must be >= 1, got {k} and {batch_size}")
    real, fake = _check(real, "real", k), _check(fake.to(real.device), "generated", k)
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"real and generated features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    centre = real.mean(dim=0)  # distances ignore it; subtracting it keeps float32 cdist accurate far from 0
    real, fake = real - centre, fake - centre
    real_radii = knn_radii(real, k, batch_size)  # (N,)
    fake_radii = knn_radii(fake, k, batch_size)  # (M,)
    real_balls_per_fake = []  # per fake block: (B,) how many real balls hold each fake point
    in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # real point inside some fake ball
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # real ball holding some fake point
    for block, radii in zip(fake.split(batch_size), fake_radii.split(batch_size)):
        dist = torch.cdist(block, real)  # (B, N)
        inside_real_ball = dist <= real_radii  # (B, N)
        real_balls_per_fake.append(inside_real_ball.sum(dim=1))
        covered |= inside_real_ball.any(dim=0)
        in_fake |= (dist <= radii[:, None]).any(dim=0)
    counts = torch.cat(real_balls_per_fake)  # (M,)
    return PRDC(
        precision=(counts > 0).float().mean().item(),
        recall=in_fake.float().mean().item(),
        density=counts.sum().item() / (k * len(fake)),
        coverage=covered.float().mean().item(),
    )
