"""Flow matching, kept apart from the network: paths, timestep sampling, label dropout and the loss.

Convention (SiT/REPA): x_t = alpha(t) x0 + sigma(t) eps with t = 0 data and t = 1 noise; the network
predicts the velocity v = alpha'(t) x0 + sigma'(t) eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .masking import gather_tokens

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class ObjectiveConfig:
    path: str = "linear"  # linear: x_t = (1-t) x0 + t eps | cosine: cos(pi t/2) x0 + sin(pi t/2) eps
    time_sampling: str = "logit_normal"  # uniform | logit_normal (the SPRINT release's "lognormal")
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    label_dropout: float = 0.1  # probability of training on the null label (enables guidance)
    repa_weight: float = 0.5  # REPA alignment loss weight (used when model.repa_depth > 0)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise UserError(f"objective.path is {self.path!r}; choose one of {', '.join(PATHS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"objective.time_sampling is {self.time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"objective.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.repa_weight < 0:
            raise UserError(f"objective.repa_weight must be >= 0, got {self.repa_weight}")
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

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        drop = torch.rand(y.shape[0], generator=generator) < self.cfg.label_dropout
        return torch.where(drop.to(y.device), torch.full_like(y, self.null_class), y)

    def loss(
        self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, features: torch.Tensor | None = None, **model_kwargs
    ) -> torch.Tensor:
        """Mean squared velocity error, plus repa_weight * the REPA loss when `features` (B, N, D) are given.
        Randomness (t, eps, label dropout) comes from `generator` (CPU)."""
        b = x0.shape[0]
        t = self.sample_t(b, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        x_t, target = self.interpolate(x0, eps, t)
        labels = self.drop_labels(y, generator)
        if features is None or self.cfg.repa_weight == 0:
            pred = model(x_t, t, labels, **model_kwargs)[:, : x0.shape[1]]
            return (pred.float() - target.float()).pow(2).mean()
        pred, projected, ids_keep = model(x_t, t, labels, return_repa=True, **model_kwargs)
        mse = (pred[:, : x0.shape[1]].float() - target.float()).pow(2).mean()
        return mse + self.cfg.repa_weight * repa_loss(projected, features, ids_keep)


def repa_loss(projected: torch.Tensor, features: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    """REPA: mean over aligned tokens of -cos(projected, target). projected (B, K, D) are the tokens at ids_keep (B, K)
    (None: all N); features (B, N, D) are the targets of every token, so dropped tokens are never aligned."""
    target = features if ids_keep is None else gather_tokens(features, ids_keep)  # (B, K, D)
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
