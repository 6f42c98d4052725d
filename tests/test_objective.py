import pytest
import torch

from sprintdit.draws import Draws
from sprintdit.errors import UserError
from sprintdit.objective import FlowMatching, ObjectiveConfig, correlate_frames


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_path_endpoints_and_velocity_is_time_derivative(path):
    fm = FlowMatching(ObjectiveConfig(path=path), null_class=10)
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(fm.interpolate(x0, eps, 0 * ones)[0], x0)
    torch.testing.assert_close(fm.interpolate(x0, eps, ones)[0], eps)
    t, h = torch.rand(4, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    numeric = (fm.interpolate(x0, eps, t + h)[0] - fm.interpolate(x0, eps, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fm.interpolate(x0, eps, t)[1], numeric, atol=1e-8, rtol=0)
    x_t, v = fm.interpolate(x0, eps, t)
    torch.testing.assert_close(fm.eps_from_velocity(x_t, v, t), eps)


def test_logit_normal_and_uniform_timesteps():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching(ObjectiveConfig(time_sampling="logit_normal"), 10).sample_t(20000, g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median() - 0.5) < 0.02
    logit = torch.log(t / (1 - t))
    assert abs(logit.std() - 1.0) < 0.03  # sigma = exp(N(0, 1)), t = sigma / (1 + sigma)
    u = FlowMatching(ObjectiveConfig(time_sampling="uniform"), 10).sample_t(20000, g)
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.25).float().mean() - 0.25) < 0.01


def test_label_dropout_uses_null_class_at_rate():
    fm = FlowMatching(ObjectiveConfig(label_dropout=0.25), null_class=7)
    y = fm.drop_labels(torch.zeros(20000, dtype=torch.long), Draws(torch.Generator().manual_seed(0)))
    assert set(y.unique().tolist()) == {0, 7}
    assert abs((y == 7).float().mean() - 0.25) < 0.015


@pytest.mark.parametrize("shape, corr", [((5, 2, 4, 4), 0.0), ((5, 2, 3, 4, 4), 0.7)])
def test_loss_is_zero_for_the_exact_velocity(shape, corr):
    """A 'network' returning eps - x0 for the drawn sample gives zero loss: the target is v = eps - x0 (on video,
    with eps's frames correlated as objective.frame_noise_corr says)."""
    fm = FlowMatching(ObjectiveConfig(label_dropout=0.0, frame_noise_corr=corr), null_class=3)
    x0 = torch.randn(*shape)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    fm.sample_t(5, g)  # the loss draws t first, then eps
    eps = correlate_frames(torch.randn(x0.shape, generator=g), corr)
    g.set_state(state)
    oracle = lambda x_t, tt, y: eps - x0  # noqa: E731
    assert fm.loss(oracle, x0, torch.zeros(5, dtype=torch.long), Draws(g)).item() == 0.0
    assert fm.loss(lambda x_t, tt, y: 0 * x_t, x0, torch.zeros(5, dtype=torch.long), Draws(g)).item() > 0.1


@pytest.mark.parametrize(
    "bad", [dict(path="vp"), dict(time_sampling="beta"), dict(label_dropout=1.0), dict(logit_std=0.0)]
)
def test_bad_objective_configs_rejected(bad):
    with pytest.raises(UserError):
        ObjectiveConfig(**bad)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_distillation_is_the_weighted_sum_of_the_two_losses(weight):
    """The target lerp(data target, teacher, w) gives (1 - w) MSE(data) + w MSE(teacher) up to a constant: the same
    gradient."""
    from sprintdit.objective import Distill

    fm = FlowMatching(ObjectiveConfig(label_dropout=0.0), null_class=3)
    x0, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    teacher = lambda x_t, t, yy: torch.sin(3 * x_t) + t.view(-1, 1, 1, 1)  # noqa: E731
    pred = torch.zeros(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    student = lambda x_t, t, yy: pred + 0.5 * x_t  # noqa: E731
    seed = lambda: Draws(torch.Generator().manual_seed(5))  # noqa: E731
    distilled = fm.loss(student, x0, y, seed(), distill=Distill(teacher, weight))
    (grad,) = torch.autograd.grad(distilled, pred)
    data_loss = fm.loss(student, x0, y, seed())
    teacher_loss = fm.loss(student, x0, y, seed(), distill=Distill(teacher, 1.0))
    (expected,) = torch.autograd.grad((1 - weight) * data_loss + weight * teacher_loss, pred)
    torch.testing.assert_close(grad, expected)
    if weight == 0.0:
        assert distilled.item() == data_loss.item()


def test_a_student_equal_to_its_teacher_has_zero_distillation_loss():
    from sprintdit.objective import DDPM, Distill

    net = lambda x_t, t, yy: torch.cos(x_t) * t.view(-1, 1, 1, 1)  # noqa: E731
    x0, y = torch.randn(3, 2, 4, 4), torch.zeros(3, dtype=torch.long)
    flow = FlowMatching(ObjectiveConfig(), null_class=3)
    assert flow.loss(net, x0, y, Draws(torch.Generator().manual_seed(0)), distill=Distill(net, 1.0)).item() == 0.0
    assert flow.loss(net, x0, y, Draws(torch.Generator().manual_seed(0))).item() > 0.1
    ddpm = DDPM(ObjectiveConfig(kind="ddpm"), null_class=3, learn_sigma=False)
    assert ddpm.loss(net, x0, y, Draws(torch.Generator().manual_seed(0)), distill=Distill(net, 1.0)).item() == 0.0


@pytest.mark.parametrize("frames, corr", [(2, 0.5), (8, 0.3), (8, 0.9)])
def test_correlated_frame_noise_has_the_mixed_prior_covariance(frames, corr):
    # The transform is linear in eps: apply it to the identity's frames and compare L L^T with (1 - c) I + c 11^T.
    basis = torch.eye(frames, dtype=torch.float64).view(frames, 1, frames, 1, 1)  # row k: frame k set to 1
    lin = correlate_frames(basis, corr).view(frames, frames)  # (draw frame, output frame)
    cov = lin.T @ lin
    expected = (1 - corr) * torch.eye(frames, dtype=torch.float64) + corr * torch.ones(
        frames, frames, dtype=torch.float64
    )
    torch.testing.assert_close(cov, expected)
    # A clip cut to its first k frames sees the same law as k frames drawn that way.
    k = frames // 2
    cut = lin[:, :k]
    torch.testing.assert_close(cut.T @ cut, expected[:k, :k])


def test_frame_noise_corr_leaves_images_and_independent_noise_alone():
    image, clip = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 2, 8, 8)
    assert correlate_frames(image, 0.5) is image and correlate_frames(clip, 0.0) is clip
    with pytest.raises(UserError, match="frame_noise_corr"):
        ObjectiveConfig(frame_noise_corr=1.0)
