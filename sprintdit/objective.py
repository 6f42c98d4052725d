"""Flow matching, kept apart from the network: paths, timestep sampling, label dropout and the loss.

Convention (SiT/REPA): x_t = alpha(t) x0 + sigma(t) eps with t = 0 data and t = 1 noise; the network
predicts the velocity v = alpha'(t) x0 + sigma'(t) eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributed import Shard, shard_rows
from .errors import UserError

SINGLE: Shard = (0, 1)  # one process: all rows

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class ObjectiveConfig:
    path: str = "linear"  # linear: x_t = (1-t) x0 + t eps | cosine: cos(pi t/2) x0 + sin(pi t/2) eps
    time_sampling: str = "logit_normal"  # uniform | logit_normal (the SPRINT release's "lognormal")
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    label_dropout: float = 0.1  # probability of training on the null label (enables guidance)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise UserError(f"objective.path is {self.path!r}; choose one of {', '.join(PATHS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"objective.time_sampling is {self.time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"objective.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.logit_std <= 0:
            raise UserError(f"objective.logit_std must be positive, got {self.logit_std}")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class FlowMatching:
    def __init__(self, cfg: ObjectiveConfig, null_class: int):
        self.cfg = cfg
        self.null_class = null_class

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.path == "linear":
            return 1 - t, t
        return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)

    def d_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.path == "linear":
            return -torch.ones_like(t), torch.ones_like(t)
        return -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for data x0, noise eps and times t (B,)."""
        (a, s), (da, ds) = self.alpha_sigma(t), self.d_alpha_sigma(t)
        a, s, da, ds = (_expand(v, x0) for v in (a, s, da, ds))
        return a * x0 + s * eps, da * x0 + ds * eps

    def eps_from_velocity(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise implied by a velocity: solves x = a x0 + s eps, v = a' x0 + s' eps for eps."""
        (a, s), (da, ds) = self.alpha_sigma(t), self.d_alpha_sigma(t)
        a, s, da, ds = (_expand(u, x) for u in (a, s, da, ds))
        return (a * v - da * x) / (a * ds - s * da)

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg.time_sampling == "uniform":
            return torch.rand(batch, generator=generator)
        z = torch.randn(batch, generator=generator) * self.cfg.logit_std + self.cfg.logit_mean
        return torch.sigmoid(z)

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None, shard: Shard = SINGLE) -> torch.Tensor:
        drop = shard_rows(torch.rand(y.shape[0] * shard[1], generator=generator), shard) < self.cfg.label_dropout
        return torch.where(drop.to(y.device), torch.full_like(y, self.null_class), y)

    def loss(
        self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, shard: Shard = SINGLE, **model_kwargs
    ) -> torch.Tensor:
        """Mean squared velocity error over x0's rows. Randomness (t, eps, label dropout) comes from `generator`
        (CPU), drawn for all `shard[1]` ranks' rows (x0 is this rank's block), so it is the same for any world size."""
        b = x0.shape[0] * shard[1]  # the global micro-batch
        t = shard_rows(self.sample_t(b, generator), shard).to(x0.device)
        eps = shard_rows(torch.randn((b, *x0.shape[1:]), generator=generator), shard).to(x0.device, x0.dtype)
        x_t, target = self.interpolate(x0, eps, t)
        pred = model(x_t, t, self.drop_labels(y, generator, shard), **model_kwargs)[:, : x0.shape[1]]
        return (pred.float() - target.float()).pow(2).mean()
