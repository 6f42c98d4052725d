"""Training objectives, kept apart from the network: flow matching (SiT/SPRINT) and DDPM (DiT, SparseDiT).

Flow matching (SiT/REPA convention): x_t = alpha(t) x0 + sigma(t) eps with t = 0 data and t = 1 noise; the
network predicts the velocity v = alpha'(t) x0 + sigma'(t) eps.

DDPM (DiT's): T steps of linear betas, x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps, the network predicts
eps and, with learned sigma, a value in [-1, 1] interpolating the log-variance between the posterior's and
beta_k (improved DDPM); loss = MSE(eps) + the variational bound with the mean frozen (the "hybrid" loss).

Whatever the objective, the network sees the noise level t = k / T in [0, 1] (1 = noise); a DiT-style
network multiplies it by model.time_scale = T, so its embedding sees the integer step k exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .draws import Draws
from .errors import UserError
from .masking import gather_tokens, generator_device
from .models.sit import RepaTap
from .sections import ObjectiveConfig  # noqa: F401  (the objective's config, re-exported beside it)

# conditional logit-normal draws keep P(T <= t) inside [floor, 1 - floor]: t stays finite in logit space
CDF_FLOOR = 1e-12


@dataclass
class Distill:
    """Knowledge distillation from a frozen teacher: the regression target becomes lerp(data target, teacher's
    prediction at the same x_t, t and condition, weight). Since (1 - w) |p - a|^2 + w |p - b|^2 equals
    |p - lerp(a, b, w)|^2 plus a constant, this is the weighted sum of the two losses, with one forward of the
    teacher."""

    teacher: torch.nn.Module  # in eval mode, no gradients; takes (x_t, t, condition) like the student
    weight: float  # 0: the data's target only; 1: the teacher's prediction only

    def target(self, target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            taught = self.teacher(x_t, t, labels)[
                :, : target.shape[1]
            ]  # the teacher's velocity (or eps), without learned sigma
        return torch.lerp(target.float(), taught.float(), self.weight)


FRAME_DIM = 2  # video tensors are (B, C, F, H, W)


def correlate_frames(eps: torch.Tensor, corr: float) -> torch.Tensor:
    """Standard normal noise (B, C, F, H, W) whose frames share a part: every value keeps unit variance and any two
    frames at one (channel, row, column) have correlation `corr`. The symmetric square root of the covariance
    (1 - corr) I + corr 11^T, applied to independent draws: sqrt(1 - corr) eps + c * (sum over frames of eps), with
    c chosen so that the all-frames direction gets variance 1 - corr + F corr. No new draws; images (4-D) and
    corr 0 pass through. The first k frames of the result have the same law as k frames made this way, so clips
    cut short (stages.N.frames) see the same prior."""
    if eps.dim() != 5 or corr == 0.0:
        return eps
    frames = eps.shape[FRAME_DIM]
    own = math.sqrt(1.0 - corr)
    shared = (math.sqrt(1.0 - corr + frames * corr) - own) / frames
    return own * eps + shared * eps.sum(FRAME_DIM, keepdim=True)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class FlowMatching:
    def __init__(self, cfg: ObjectiveConfig, null_class: int):
        if cfg.kind != "flow":
            raise UserError(
                f"objective.kind {cfg.kind!r} is not flow matching; this version trains and samples flow runs only"
            )
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

    def time_cdf(self, t: float) -> float:
        """P(T <= t) under the training distribution of t (uniform or logit-normal)."""
        if self.cfg.time_sampling == "uniform" or t <= 0.0 or t >= 1.0:
            return min(max(t, 0.0), 1.0)
        return 0.5 * math.erfc(-(math.log(t / (1.0 - t)) - self.cfg.logit_mean) / (self.cfg.logit_std * math.sqrt(2.0)))

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, cdf: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """(batch,) noise levels from the training distribution; with `cdf` (lo, hi), from that distribution
        conditioned on P(T <= t) in [lo, hi) (inverse-CDF draws: the gated strata of SparseDiT training)."""
        if cdf is not None:
            u = cdf[0] + (cdf[1] - cdf[0]) * torch.rand(
                batch, generator=generator, device=generator_device(generator), dtype=torch.float64
            )
            if self.cfg.time_sampling == "uniform":
                return u.float()
            z = torch.special.ndtri(u.clamp(CDF_FLOOR, 1.0 - CDF_FLOOR)) * self.cfg.logit_std + self.cfg.logit_mean
            return torch.sigmoid(z).float()
        if self.cfg.time_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=generator_device(generator))
        z = (
            torch.randn(batch, generator=generator, device=generator_device(generator)) * self.cfg.logit_std
            + self.cfg.logit_mean
        )
        return torch.sigmoid(z)

    def drop_labels(self, y: torch.Tensor, draws: Draws) -> torch.Tensor:
        drop = draws.rand(y.shape[0]) < self.cfg.label_dropout  # (B,)
        return torch.where(drop.to(y.device).view(-1, *[1] * (y.dim() - 1)), null_like(y, self.null_class), y)

    def loss(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        draws: Draws,
        features: torch.Tensor | None = None,
        t_cdf: tuple[float, float] | None = None,
        distill: Distill | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Mean squared velocity error over x0's rows, plus repa_weight * the REPA loss when `features` (B, N, D)
        are given. Randomness (t, eps, label dropout, in that order) comes from `draws`: drawn for every rank's rows
        (x0 is this rank's block), so it is the same for any world size. `t_cdf`: draw t within that stratum.
        `distill`: the target moves towards a teacher's velocity."""
        # no copy when drawn on x0's device
        t = draws.keep(self.sample_t(draws.total(x0.shape[0]), draws.generator, t_cdf)).to(x0.device)
        eps = correlate_frames(draws.randn(x0.shape[0], *x0.shape[1:]), self.cfg.frame_noise_corr).to(
            x0.device, x0.dtype
        )
        x_t, target = self.interpolate(x0, eps, t)
        labels = self.drop_labels(y, draws)
        if distill is not None:
            target = distill.target(target, x_t, t, labels)
        if features is None or self.cfg.repa_weight == 0:
            pred = model(x_t, t, labels, **model_kwargs)[:, : x0.shape[1]]
            return (pred.float() - target.float()).pow(2).mean()
        tap = RepaTap()
        pred = model(x_t, t, labels, repa=tap, **model_kwargs)
        mse = (pred[:, : x0.shape[1]].float() - target.float()).pow(2).mean()
        return mse + self.cfg.repa_weight * repa_loss(tap.projected, features, tap.ids_keep)


def null_like(y: torch.Tensor, null: int | torch.Tensor) -> torch.Tensor:
    """The unconditional input for every row of y: the null label (y (B,)), the empty text's ids (y (B, L)), or for
    caption embeddings (y (B, L, E)) the null table (L, E) zeroed where each caption pads (an all-zero table, the
    empty text, stays all zero; a learned one keeps the caption's length, as PixArt's original release masks it)."""
    out = torch.as_tensor(null, dtype=y.dtype, device=y.device).expand_as(y)
    return out * y.ne(0).any(dim=-1, keepdim=True) if y.dim() == 3 else out  # (B, L, E): padding rows zero


def repa_loss(projected: torch.Tensor, features: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    """REPA: mean over aligned tokens of -cos(projected, target). projected (B, K, D) are the tokens at ids_keep (B, K)
    (None: all N); features (B, N, D) are the targets of every token, so dropped tokens are never aligned."""
    target = features if ids_keep is None else gather_tokens(features, ids_keep)  # (B, K, D)
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


def linear_betas(cfg: ObjectiveConfig) -> torch.Tensor:
    return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=torch.float64)


def spaced_steps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` of the T training steps, evenly spaced and including 0 and T - 1 (DiT's respacing of one section)."""
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"DDPM sampling steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def solver_steps(num_timesteps: int, steps: int, spacing: str) -> list[int]:
    """The training steps a multistep solver visits, noisiest first, chosen as diffusers' schedulers do
    (`timestep_spacing`; Lin et al. 2023, table 2): linspace rounds steps + 1 points from 0 to T - 1 and drops 0;
    leading takes multiples of T // (steps + 1); trailing counts down from T - 1 by T / steps."""
    if not 1 <= steps < num_timesteps:
        raise UserError(f"DPM-Solver++ steps must be in [1, {num_timesteps - 1}], got {steps}")
    if spacing == "linspace":
        points = torch.linspace(0, num_timesteps - 1, steps + 1, dtype=torch.float64).round()
        return [int(t) for t in points.flip(0)[:-1]]
    if spacing == "leading":
        ratio = num_timesteps // (steps + 1)
        return [i * ratio for i in range(steps, 0, -1)]
    ratio = num_timesteps / steps
    return [round(num_timesteps - i * ratio) - 1 for i in range(steps)]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bins: int = 256
) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to `bins` levels under N(mean, e^(2 log_scale)), elementwise;
    the edge bins extend to +-infinity."""
    half_bin = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + half_bin))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - half_bin))
    tiny = torch.finfo(torch.float32).tiny
    log_probs = torch.log((cdf_plus - cdf_minus).clamp(min=tiny))
    log_probs = torch.where(x < -1 + half_bin, torch.log(cdf_plus.clamp(min=tiny)), log_probs)
    return torch.where(x > 1 - half_bin, torch.log((1 - cdf_minus).clamp(min=tiny)), log_probs)


class DiffusionProcess:
    """Closed-form quantities of a discrete Gaussian diffusion with the given betas (float64, (K,) each).

    `steps` maps each of the K indices to the training step the network is told (k of T): the full process
    has steps 0..T-1; a respaced one (fewer sampling steps) keeps the cumulative alphas of its steps.
    """

    def __init__(self, betas: torch.Tensor, steps: list[int], num_timesteps: int):
        self.steps, self.num_timesteps = steps, num_timesteps
        self.betas = betas
        self.abar = torch.cumprod(1 - betas, dim=0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), self.abar[:-1]])
        self.posterior_var = betas * (1 - self.abar_prev) / (1 - self.abar)
        # log of the posterior variance, its first (zero) entry replaced by the second
        self.posterior_logvar = torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        self.coef_x0 = betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.coef_xt = (1 - self.abar_prev) * (1 - betas).sqrt() / (1 - self.abar)

    @classmethod
    def respaced(cls, full: "DiffusionProcess", steps: list[int]) -> "DiffusionProcess":
        abar = full.abar[steps]
        prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return cls(1 - abar / prev, steps, full.num_timesteps)

    def take(self, table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(table[index.cpu()].to(like.device), like)

    def noise_level(self, index: torch.Tensor) -> torch.Tensor:
        """What the network is told: the training step k / T (float64, so k * T / T is exact)."""
        return torch.tensor(self.steps, dtype=torch.float64)[index.cpu()] / self.num_timesteps

    def q_sample(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.take(self.abar.sqrt(), index, x0) * x0 + self.take((1 - self.abar).sqrt(), index, x0) * eps

    def x0_from_eps(self, x: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.take(self.abar.rsqrt(), index, x) * x - self.take((1 / self.abar - 1).sqrt(), index, x) * eps

    def posterior(self, x0: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{k-1} | x_k, x0)."""
        mean = self.take(self.coef_x0, index, x) * x0 + self.take(self.coef_xt, index, x) * x
        return mean, self.take(self.posterior_logvar, index, x)

    def model_logvar(self, v: torch.Tensor | None, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Learned: interpolate between the posterior's log-variance and log beta by (v + 1) / 2; fixed: the
        posterior's."""
        low = self.take(self.posterior_logvar, index, like)
        if v is None:
            return low.expand_as(like)
        frac = (v + 1) / 2
        return frac * self.take(torch.log(self.betas), index, like) + (1 - frac) * low


class DDPM:
    """DiT's DDPM objective: epsilon prediction, optional learned sigma, hybrid loss."""

    def __init__(self, cfg: ObjectiveConfig, null_class: int, learn_sigma: bool):
        self.cfg, self.null_class, self.learn_sigma = cfg, null_class, learn_sigma
        self.process = DiffusionProcess(linear_betas(cfg), list(range(cfg.num_timesteps)), cfg.num_timesteps)

    drop_labels = FlowMatching.drop_labels  # the same label dropout (and its per-rank slicing)

    def split(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network output -> (eps, variance value v or None)."""
        return out[:, :channels], (out[:, channels : 2 * channels] if self.learn_sigma else None)

    def vb_bits(
        self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """The variational-bound term per sample, in bits per dimension, with the predicted mean frozen."""
        p = self.process
        mean, logvar = p.posterior(p.x0_from_eps(x_t, eps.detach(), index), x_t, index)
        logvar = p.model_logvar(v, index, x_t)
        true_mean, true_logvar = p.posterior(x0, x_t, index)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(index.to(x0.device) == 0, nll, kl)

    def loss(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        draws: Draws,
        features: torch.Tensor | None = None,
        distill: Distill | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """MSE on eps (+ the variational bound when sigma is learned) over x0's rows. Randomness (step, eps, label
        dropout) comes from `draws`, for every rank's rows as in flow matching. `distill`: the eps target moves
        towards a teacher's eps (the variational bound keeps the true posterior)."""
        if features is not None:
            raise UserError("REPA (model.repa.depth) is implemented for flow matching only, not objective.kind ddpm")
        channels = x0.shape[1]
        index = draws.randint(self.cfg.num_timesteps, x0.shape[0])
        eps = correlate_frames(draws.randn(x0.shape[0], *x0.shape[1:]), self.cfg.frame_noise_corr).to(
            x0.device, x0.dtype
        )
        x_t = self.process.q_sample(x0, eps, index)
        t = self.process.noise_level(index).to(x0.device)
        labels = self.drop_labels(y, draws)
        out = model(x_t, t, labels, **model_kwargs).float()
        pred, v = self.split(out, channels)
        target = eps if distill is None else distill.target(eps, x_t, t, labels)
        mse = (pred - target.float()).pow(2).flatten(1).mean(1)
        if v is None:
            return mse.mean()
        return (mse + self.vb_bits(pred, v, x0.float(), x_t.float(), index)).mean()


def build_objective(cfg: ObjectiveConfig, null_class: int, learn_sigma: bool):
    """The objective `cfg.kind` names."""
    if cfg.kind == "ddpm":
        return DDPM(cfg, null_class, learn_sigma)
    return FlowMatching(cfg, null_class)
