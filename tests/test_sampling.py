import math

import pytest
import torch
from conftest import perturbed_model, tiny_inputs

from sprintdit.objective import FlowMatching, ObjectiveConfig
from sprintdit.sampling import SampleConfig, SampleNoise, dopri5, euler, euler_maruyama, generate, guided_output, heun

MU, SIGMA = 1.5, 0.5  # data distribution N(MU, SIGMA^2)


def gaussian_velocity(x, t):
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU, SIGMA^2), linear path."""
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x - (1 - t) * MU
    e_eps = t / var * centred
    e_x0 = MU + (1 - t) * SIGMA**2 / var * centred
    return e_eps - e_x0


def test_euler_and_heun_converge_at_their_order():
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = MU + SIGMA * z  # the ODE maps noise z to MU + SIGMA z
    for solver, order in ((euler, 1), (heun, 2)):
        errors = [(solver(gaussian_velocity, z.clone(), n) - exact).abs().max().item() for n in (16, 32, 64)]
        rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert all(abs(r - order) < 0.25 for r in rates), (solver.__name__, errors, rates)
    assert (heun(gaussian_velocity, z.clone(), 64) - exact).abs().max() < 3e-4


def test_dopri5_meets_its_tolerance_on_the_gaussian():
    pytest.importorskip("torchdiffeq")
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = MU + SIGMA * z
    calls = []

    def counted(x, t):
        calls.append(t)
        return gaussian_velocity(x, t)

    loose = (dopri5(counted, z.clone(), atol=1e-4, rtol=1e-4) - exact).abs().max()
    cheap = len(calls)
    tight = (dopri5(counted, z.clone(), atol=1e-10, rtol=1e-10) - exact).abs().max()
    # tighter: more evaluations, smaller error
    assert tight < 1e-8 and loose < 1e-2 and tight < loose and len(calls) - cheap > cheap
    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    out = generate(model, fm, [1, 2], [0, 1], SampleConfig(sampler="dopri5", guidance="cfg", scale=1.5), "cpu")
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()


def test_sde_reaches_the_data_distribution():
    fm = FlowMatching(ObjectiveConfig(), null_class=0)
    noise = SampleNoise(list(range(4000)), "cpu")
    x = noise.randn((1,)).double()
    out = euler_maruyama(gaussian_velocity, x, 100, fm, noise, last_t=0.04)
    assert abs(out.mean().item() - MU) < 0.04
    assert abs(out.std().item() - SIGMA) < 0.04


def test_cfg_scale_one_equals_conditional_model():
    model = perturbed_model()
    x, t, y = tiny_inputs(model)
    y = y.clamp(max=model.config.num_classes - 1)
    v = guided_output(model, y, SampleConfig(guidance="cfg", scale=1.0), channels=2)
    expected = model(x, torch.full((3,), 0.4, dtype=x.dtype), y)
    torch.testing.assert_close(v(x, 0.4), expected, rtol=0, atol=1e-6)


def test_pdg_velocity_is_guidance_with_the_path_dropped_branch():
    model = perturbed_model()
    x, _, _ = tiny_inputs(model)
    y = torch.tensor([0, 1, 4])
    tt = torch.full((3,), 0.6, dtype=x.dtype)
    cond = model(x, tt, y)
    uncond = model(x, tt, torch.full_like(y, model.null_class), path_drop=torch.ones(3, dtype=torch.bool))
    v = guided_output(model, y, SampleConfig(guidance="pdg", scale=3.0), channels=2)(x, 0.6)[:, :2]
    torch.testing.assert_close(v, uncond + 3.0 * (cond - uncond), rtol=0, atol=1e-6)


def test_guidance_interval_leaves_other_steps_conditional():
    model = perturbed_model()
    x, _, _ = tiny_inputs(model)
    y = torch.tensor([0, 1, 4])
    v = guided_output(model, y, SampleConfig(guidance="cfg", scale=4.0, interval=[0.0, 0.5]), channels=2)
    torch.testing.assert_close(v(x, 0.8), model(x, torch.full((3,), 0.8, dtype=x.dtype), y), rtol=0, atol=0)
    assert not torch.allclose(v(x, 0.3), model(x, torch.full((3,), 0.3, dtype=x.dtype), y))


@pytest.mark.parametrize("sampler,guidance", [("euler", "pdg"), ("sde", "cfg"), ("heun", "none")])
def test_sample_depends_only_on_its_seed_and_label(sampler, guidance):
    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    cfg = SampleConfig(sampler=sampler, steps=4, guidance=guidance, batch_size=8)
    alone = generate(model, fm, [3], [7], cfg, "cpu")
    in_batch = generate(model, fm, [1, 3, 0, 2], [0, 7, 9, 11], cfg, "cpu")
    other_batch = generate(model, fm, [3, 4], [7, 1], SampleConfig(**{**vars(cfg), "batch_size": 1}), "cpu")
    torch.testing.assert_close(in_batch[1:2], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(other_batch[0:1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(in_batch[0:1], alone, atol=1e-3)
