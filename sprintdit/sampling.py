"""Samplers, guidance (CFG, Path-Drop Guidance) and per-sample seeds.

Flow matching: Euler / Heun ODE and Euler-Maruyama SDE integrate a velocity function v(x, t) from t = 1
(noise) to t = 0 (data). DDPM: ancestral sampling and DDIM (eta 0) over `steps` evenly respaced steps.
Samplers know nothing about networks; `guided_output` turns a network into a function of (x, t). Every
sample draws its noise from its own generator, seeded by its own seed, so an image depends only on its
seed and label.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Callable

import torch

from .density import keep_at, parse_keep
from .distributed import Dist, batches_of_rank, gather_to_main
from .errors import UserError
from .masking import keep_levels, shared_mask
from .objective import DDPM, DiffusionProcess, FlowMatching, correlate_frames, null_like, solver_steps, spaced_steps
from .sections import SampleConfig, check_sampling
from .text import check_token_ids

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
FIXED_MASK_SEED = 0  # sample.middle_mask fixed: the seed of the one draw every step uses


class SampleNoise:
    """One CPU generator per sample: draws are stacked, so a sample's noise ignores its batch-mates. Video noise
    has the objective's frame correlation, in the starting point and in every stochastic step (the process the
    model was trained on adds noise of that law; with it, -eps / sigma stands for the covariance times the score)."""

    def __init__(self, seeds: list[int], device: torch.device | str, frame_corr: float = 0.0):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device
        self.frame_corr = frame_corr

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(len(seeds), *shape) standard normal (frames correlated as the objective says)."""
        drawn = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return correlate_frames(drawn, self.frame_corr).to(self.device)


def time_grid(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def euler(v: VelocityFn, x: torch.Tensor, steps: int) -> torch.Tensor:
    ts = time_grid(steps)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * v(x, t)
    return x


def heun(v: VelocityFn, x: torch.Tensor, steps: int) -> torch.Tensor:
    ts = time_grid(steps)
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        d = v(x, t)
        x_pred = x + dt * d
        x = x + dt * 0.5 * (d + v(x_pred, t_next))
    return x


def dopri5(v: VelocityFn, x: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) from t = 1 to 0 (torchdiffeq, as SiT's ODE sampler). The step sizes follow
    the error of the whole batch, so a sample matches its own run in another batch only up to the tolerance."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise UserError("sampler dopri5 needs torchdiffeq: pip install torchdiffeq (or sprintdit[ode])") from None
    ts = torch.tensor([1.0, 0.0], dtype=torch.float64, device=x.device)
    return odeint(lambda t, z: v(z, float(t)), x, ts, method="dopri5", atol=atol, rtol=rtol)[-1]


def euler_maruyama(
    v: VelocityFn, x: torch.Tensor, steps: int, objective: FlowMatching, noise: SampleNoise, last_t: float
) -> torch.Tensor:
    """Reverse SDE dx = [v - w/2 score] dt + sqrt(w) dW with w(t) = 2 sigma(t) (SiT's choice).

    steps - 1 noisy steps from t = 1 to `last_t`, then one deterministic step to t = 0.
    """
    ts = torch.linspace(1.0, last_t, steps, dtype=torch.float64).tolist() + [0.0]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        tt = torch.full((x.shape[0],), t, device=x.device)
        vel = v(x, t)
        _, sigma = objective.alpha_sigma(tt)
        w = 2 * sigma.reshape(-1, *([1] * (x.dim() - 1)))
        score = -objective.eps_from_velocity(x, vel, tt) / sigma.reshape_as(w)
        dt = t_next - t
        x = x + (vel - 0.5 * w * score) * dt
        if i < len(ts) - 2:
            x = x + (w * abs(dt)).sqrt() * noise.randn(tuple(x.shape[1:])).to(x.dtype)
    return x


def ddpm_loop(
    out: VelocityFn, x: torch.Tensor, objective: DDPM, steps: int, noise: SampleNoise, ddim: bool
) -> torch.Tensor:
    """Ancestral DDPM (learned or posterior variance) or deterministic DDIM over `steps` respaced steps."""
    process = DiffusionProcess.respaced(objective.process, spaced_steps(objective.cfg.num_timesteps, steps))
    for i in reversed(range(len(process.steps))):
        index = torch.full((x.shape[0],), i)
        eps, v = objective.split(out(x, float(process.noise_level(index[:1]))).float(), x.shape[1])
        x0 = process.x0_from_eps(x, eps, index)
        if ddim:
            abar_prev = process.take(process.abar_prev, index, x)
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        else:
            mean, _ = process.posterior(x0, x, index)
            x = mean + (
                torch.exp(0.5 * process.model_logvar(v, index, x)) * noise.randn(tuple(x.shape[1:])) if i > 0 else 0
            )
    return x


def dpm_solver_pp(out: VelocityFn, x: torch.Tensor, objective: DDPM, steps: int, spacing: str) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the diffusion ODE solved in data prediction, second order from the previous
    step's prediction (multistep), first order at the first step and at the last, which lands on sigma 0 (the denoised
    prediction). As diffusers' DPMSolverMultistepScheduler with algorithm_type dpmsolver++, solver_order 2, solver_type
    midpoint, final_sigmas_type zero; the schedule in float64."""
    num_timesteps, channels = objective.cfg.num_timesteps, x.shape[1]
    abar = objective.process.abar  # (T,) float64
    visited = solver_steps(num_timesteps, steps, spacing)
    sigmas = [((1 - abar[t]) / abar[t]).sqrt().item() for t in visited] + [0.0]  # x_t / alpha_t = x0 + sigma eps
    previous = None  # (the last step's data prediction, its lambda)
    for i, t in enumerate(visited):
        eps, _ = objective.split(out(x, t / num_timesteps).float(), channels)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha_s, sigma_s = 1 / math.sqrt(sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)
        x0 = (x - sigma_s * eps) / alpha_s
        if sigma_next == 0:
            return x0
        alpha_t, sigma_t = 1 / math.sqrt(sigma_next**2 + 1), sigma_next / math.sqrt(sigma_next**2 + 1)
        lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)  # half log-SNR
        h = lam_t - lam_s
        # D0 + D1 / 2, with D1 = (x0 - x0_prev) h / h_prev: the midpoint multistep correction
        data = x0 if previous is None else x0 + 0.5 * (x0 - previous[0]) * h / (lam_s - previous[1])
        x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * data
        previous = (x0, lam_s)
    return x


def time_seed(t: float) -> int:
    """A seed that is a function of the noise level alone: the CRC-32 of t as a float64 (the CPU generator keeps 32 bits
    of a seed, and those of a float64's bits are zero for t = k / 2^n)."""
    return zlib.crc32(struct.pack("<d", t))


def middle_options(model, cfg: SampleConfig) -> Callable[[float, int, torch.device], dict]:
    """f(t, batch, device) -> the forward's keyword arguments that thin SPRINT's middle blocks at noise level t:
    {"mask": one structured mask for the whole batch (`cfg.middle_keep` of the tokens)}, or {} (every token)."""
    schedule = parse_keep(cfg.middle_keep)
    if schedule.dense:
        return lambda t, batch, device: {}
    grid = model.config.grid
    levels = keep_levels(grid, schedule.sparsest)
    low, high = cfg.middle_interval

    def options(t: float, batch: int, device: torch.device) -> dict:
        keep = keep_at(schedule, t, levels)
        if keep == 1 or not low <= t <= high:
            return {}
        seed = FIXED_MASK_SEED if cfg.middle_mask == "fixed" else time_seed(t)
        return {"mask": shared_mask(batch, grid, keep, seed).to(device)}

    return options


def guided_output(model, y: torch.Tensor, cfg: SampleConfig, channels: int) -> VelocityFn:
    """out(x, t) of `model` for labels y with the configured guidance; one forward of 2B when guiding.

    The first `channels` output channels (velocity or eps) are guided; any others (a learned variance)
    come from the conditional half. PDG: the unconditional half takes the path-dropped branch (null label,
    middle blocks skipped). A thinned middle (`cfg.middle_keep`) sees the same tokens in both halves.
    """
    null = null_like(y, model.null_class)  # (B,) null labels or (B, L) empty texts
    low, high = cfg.interval
    middle = middle_options(model, cfg)

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        step = model.step_options(t)  # SparseDiT: the grid side at t
        if cfg.guidance == "none" or not low <= t <= high:
            step = {**step, **middle(t, b, x.device)}
            return model(x, torch.full((b,), t, device=x.device, dtype=torch.float64), y, **step)
        step = {**step, **middle(t, 2 * b, x.device)}
        x2 = torch.cat([x, x])  # (2B, C, H, W)
        t2 = torch.full((2 * b,), t, device=x.device, dtype=torch.float64)
        kwargs = {"middle_rows": b, **step} if cfg.guidance == "pdg" else step
        out = model(x2, t2, torch.cat([y, null]), **kwargs)
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # combine in at least fp32
        cond, uncond = out[:b], out[b:]
        guided = uncond[:, :channels] + cfg.scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1).to(x.dtype)

    return v


def check_request(
    model, objective: FlowMatching | DDPM, labels: list[int], seeds: list[int], cfg: SampleConfig
) -> None:
    """Raise a UserError for labels, seeds, guidance or a sampler the model cannot sample."""
    if len(labels) != len(seeds):
        raise UserError(f"got {len(labels)} labels but {len(seeds)} seeds")
    mc = model.config
    if mc.condition == "text" and mc.text.encoder == "learned":
        check_token_ids(labels, mc)
    elif mc.condition == "text":
        shape = (mc.text.max_tokens, mc.text.dim)
        if any(tuple(torch.as_tensor(row).shape) != shape for row in labels):
            raise UserError(f"caption embeddings must each be {shape} (max_tokens, dim) for this model")
        if cfg.guidance != "none" and not model.y_embedder.empty.any():
            raise UserError(
                "this model's unconditional caption is unset (a diffusers import): sample prompts with "
                "--text-encoder-path (it encodes the empty prompt), or convert with --text-encoder-path"
            )
    else:
        bad = [y for y in labels if not 0 <= y < mc.num_classes]
        if bad:
            raise UserError(f"labels must be in [0, {mc.num_classes - 1}], got {bad[:5]}")
    check_sampling(mc, "ddpm" if isinstance(objective, DDPM) else "flow", cfg)


@torch.no_grad()
def generate(
    model,
    objective: FlowMatching | DDPM,
    labels: list,
    seeds: list[int],
    cfg: SampleConfig,
    device,
    progress: bool = False,
) -> torch.Tensor:
    """Samples (N, C, H, W) in the model's data space for the given conditions (labels, or captions: token-id
    rows or embeddings, e.g. from text_encoders.encode_prompts) and per-sample seeds."""
    check_request(model, objective, labels, seeds, cfg)
    mc = model.config
    ddpm = isinstance(objective, DDPM)
    out = []
    chunks = range(0, len(labels), cfg.batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="sampling", unit="batch")
    for start in chunks:
        # (B,), (B, L) or (B, L, E)
        y = torch.stack([torch.as_tensor(row) for row in labels[start : start + cfg.batch_size]]).to(device)
        noise = SampleNoise(seeds[start : start + cfg.batch_size], device, objective.cfg.frame_noise_corr)
        x = noise.randn((mc.in_channels, *mc.input_size))
        out_fn = guided_output(model, y, cfg, mc.in_channels)

        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            return out_fn(x, t)[:, : mc.in_channels]

        if cfg.sampler == "dpm-solver++":
            x = dpm_solver_pp(out_fn, x, objective, cfg.steps, cfg.timestep_spacing)
        elif ddpm:
            x = ddpm_loop(out_fn, x, objective, cfg.steps, noise, ddim=cfg.sampler == "ddim")
        elif cfg.sampler == "euler":
            x = euler(v, x, cfg.steps)
        elif cfg.sampler == "heun":
            x = heun(v, x, cfg.steps)
        elif cfg.sampler == "dopri5":
            x = dopri5(v, x, cfg.atol, cfg.rtol)
        else:
            x = euler_maruyama(v, x, cfg.steps, objective, noise, cfg.sde_last_t)
        out.append(x.float().cpu())
    return torch.cat(out)


def generate_on_ranks(
    model,
    objective: FlowMatching | DDPM,
    labels: list[int],
    seeds: list[int],
    cfg: SampleConfig,
    d: Dist,
    progress: bool = False,
) -> torch.Tensor | None:
    """`generate` with whole sampling batches spread over the ranks (batch k on rank k mod W): rank 0 gets all
    samples (N, C, H, W) in the requested order, the other ranks None. Every sample is computed in the same
    batch as with one process, so the result is identical (bitwise on one kind of device) for any world size."""
    check_request(model, objective, labels, seeds, cfg)  # on every rank, before any rank waits for another
    mine = [i for block in batches_of_rank(len(labels), cfg.batch_size, d.shard) for i in block]
    part = (
        generate(
            model, objective, [labels[i] for i in mine], [seeds[i] for i in mine], cfg, d.device, progress and d.is_main
        )
        if mine
        else None
    )
    parts = gather_to_main(d, (mine, part), "gathering samples on rank 0")
    if parts is None:
        return None
    order = torch.tensor([i for ids, _ in parts for i in ids])
    samples = torch.cat([x for _, x in parts if x is not None])
    return samples[torch.argsort(order)]
