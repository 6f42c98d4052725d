import math

import pytest
import torch

from sprintdit.objective import DDPM, DiffusionProcess, ObjectiveConfig, build_objective, solver_steps, spaced_steps
from sprintdit.sampling import ddpm_loop, dpm_solver_pp

DATA_STD = 0.5  # data ~ N(0, DATA_STD^2): the optimal eps predictor is known in closed form


def gaussian_eps(objective: DDPM, learn_sigma_value: float | None = None):
    """out(x, t) of the exact eps predictor for Gaussian data (t = k / T); optional constant variance output."""
    abar = objective.process.abar

    def out(x: torch.Tensor, t: float) -> torch.Tensor:
        a = abar[round(t * objective.cfg.num_timesteps)]
        eps = (1 - a).sqrt() * x / (a * DATA_STD**2 + 1 - a)
        return eps if learn_sigma_value is None else torch.cat([eps, torch.full_like(x, learn_sigma_value)], dim=1)

    return out


class BatchNoise:
    def __init__(self, batch: int, seed: int):
        self.batch, self.g = batch, torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return torch.randn(self.batch, *shape, generator=self.g, dtype=torch.float64)


def test_spaced_steps_match_dits_respacing():
    steps = spaced_steps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert steps[:4] == [0, 4, 8, 12] and steps[124] == round(124 * 999 / 249)
    assert spaced_steps(1000, 1000) == list(range(1000))


def test_respacing_all_steps_is_the_original_process():
    full = DDPM(ObjectiveConfig(kind="ddpm"), 10, learn_sigma=True).process
    again = DiffusionProcess.respaced(full, list(range(1000)))
    torch.testing.assert_close(again.betas, full.betas)
    torch.testing.assert_close(again.posterior_logvar, full.posterior_logvar)


def test_x0_from_eps_inverts_q_sample():
    p = DDPM(ObjectiveConfig(kind="ddpm"), 10, learn_sigma=False).process
    x0, eps = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    k = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(p.x0_from_eps(p.q_sample(x0, eps, k), eps, k), x0)


def test_variational_bound_vanishes_for_the_true_posterior():
    obj = DDPM(ObjectiveConfig(kind="ddpm"), 10, learn_sigma=True)
    p, g = obj.process, torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    k = torch.tensor([1, 300, 999])
    x_t = p.q_sample(x0, eps, k)
    v_posterior = -torch.ones_like(x0)  # frac 0: the posterior's log-variance
    assert obj.vb_bits(eps, v_posterior, x0, x_t, k).abs().max() < 1e-9
    wrong = obj.vb_bits(eps + 0.1, v_posterior, x0, x_t, k)
    assert (wrong > 0).all()
    # KL of N(m1, s^2) to N(m2, s^2) in bits = (m1 - m2)^2 / (2 s^2 ln 2) with the mean error coef_x0 * dx0
    dx0 = p.x0_from_eps(x_t, eps + 0.1, k) - x0
    dmean = p.take(p.coef_x0, k, x0) * dx0
    expected = (dmean**2 / (2 * p.take(p.posterior_logvar, k, x0).exp()) / math.log(2)).flatten(1).mean(1)
    torch.testing.assert_close(wrong, expected)


def test_ddim_on_gaussian_data_matches_the_closed_form():
    """With the exact eps, every DDIM step is x <- f_k x; the product of the f_k is known."""
    obj = DDPM(ObjectiveConfig(kind="ddpm"), 10, learn_sigma=False)
    steps = spaced_steps(1000, 50)
    x_t = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ddpm_loop(gaussian_eps(obj), x_t.clone(), obj, 50, BatchNoise(6, 0), ddim=True)
    abar, s2, factor = obj.process.abar, DATA_STD**2, 1.0
    for i in reversed(range(50)):
        a = abar[steps[i]]
        a_prev = abar[steps[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        factor *= ((a_prev * a).sqrt() * s2 + ((1 - a_prev) * (1 - a)).sqrt()) / (a * s2 + 1 - a)
    torch.testing.assert_close(out, factor * x_t)
    assert abs(float(factor) - DATA_STD) < 0.04  # 50 steps nearly map N(0, 1) onto the data std (0.472 vs 0.5)


@pytest.mark.parametrize("learned", [False, True])
def test_ancestral_ddpm_on_gaussian_data_has_the_predicted_variance(learned):
    """x <- a_k x + sigma_k z per step; the variance recursion gives the final variance. A learned variance
    output of -1 means the posterior's variance, so it must give the same samples as the fixed one."""
    obj = DDPM(ObjectiveConfig(kind="ddpm"), 10, learn_sigma=learned)
    steps, n = spaced_steps(1000, 50), 20000
    x = BatchNoise(n, 1).randn((1, 1, 1))
    out = ddpm_loop(gaussian_eps(obj, -1.0 if learned else None), x, obj, 50, BatchNoise(n, 2), ddim=False)
    process = DiffusionProcess.respaced(obj.process, steps)
    var = 1.0
    for i in reversed(range(50)):
        a = obj.process.abar[steps[i]]
        x0_gain = a.sqrt() * DATA_STD**2 / (a * DATA_STD**2 + 1 - a)
        gain = process.coef_x0[i] * x0_gain + process.coef_xt[i]
        var = gain**2 * var + (process.posterior_var[i] if i > 0 else 0.0)
    assert abs(out.var().item() - float(var)) < 0.03 * float(var)  # 20000 samples: ~1% standard error
    assert abs(float(var) ** 0.5 - DATA_STD) < 0.07  # 50 steps with the posterior variance: 0.443 vs 0.5


def test_build_objective_picks_the_kind():
    assert isinstance(build_objective(ObjectiveConfig(kind="ddpm"), 10, True), DDPM)
    with pytest.raises(Exception, match="objective.kind"):
        ObjectiveConfig(kind="edm")


def test_dpm_solver_pp_on_gaussian_data_converges_to_the_closed_form_at_second_order():
    """With the exact eps of Gaussian data the probability-flow ODE keeps x_t / std_t constant, and the last step's
    denoised prediction is the posterior mean: a closed form for the solver's output. Its error falls 4x when the
    steps double (second order; a first-order solver halves it)."""
    objective = DDPM(ObjectiveConfig(kind="ddpm"), null_class=0, learn_sigma=True)
    abar = objective.process.abar
    x_start = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(steps: int) -> float:
        visited = solver_steps(1000, steps, "linspace")
        std = [(abar[k] * DATA_STD**2 + 1 - abar[k]).sqrt() for k in (visited[0], visited[-1])]
        expected = x_start / std[0] * abar[visited[-1]].sqrt() * DATA_STD**2 / std[1]
        out = dpm_solver_pp(gaussian_eps(objective, learn_sigma_value=0.3), x_start, objective, steps, "linspace")
        return float((out - expected).abs().max() / expected.abs().max())

    coarse, fine = error(320), error(640)
    assert fine < 3e-4 and coarse / fine > 3.5, (coarse, fine)


@pytest.mark.parametrize("spacing,steps", [("linspace", 20), ("linspace", 7), ("leading", 10), ("trailing", 12)])
def test_dpm_solver_pp_equals_diffusers_step_for_step(spacing, steps):
    """The same network outputs through diffusers' DPMSolverMultistepScheduler (PixArt's configuration) and through
    ours: the same training steps visited and the same final sample (float32 in diffusers, float64 schedule here)."""
    diffusers = pytest.importorskip("diffusers")
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.2

    def eps_of(x: torch.Tensor, step: int) -> torch.Tensor:  # a fixed nonlinear "network" of (x, training step)
        return torch.tanh(torch.einsum("oc,bchw->bohw", weights, x)) * (1 + step / 1000) + 0.1 * x

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", timestep_spacing=spacing,
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    x_start = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = x_start.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(eps_of(theirs, int(t)), t, theirs).prev_sample
    seen = []

    def out(x: torch.Tensor, t: float) -> torch.Tensor:
        seen.append(round(t * 1000))
        return eps_of(x, seen[-1])

    objective = DDPM(ObjectiveConfig(kind="ddpm"), null_class=0, learn_sigma=False)
    ours = dpm_solver_pp(out, x_start.clone(), objective, steps, spacing)
    assert seen == scheduler.timesteps.tolist()
    assert (ours - theirs).abs().max() <= 2e-5 * theirs.abs().max(), (ours - theirs).abs().max()
