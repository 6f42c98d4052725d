import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from sprintdit.fashion_mnist import FashionMNIST
from sprintdit.errors import UserError
from sprintdit.metrics import (
    class_agreement,
    classify,
    feature_stats,
    frechet_distance,
    inception_score,
    load_classifier,
    prdc,
)
from sprintdit.files import sha256_file as sha256
from sprintdit.metrics.fmnist_classifier import FEATURE_DIM, NUM_CLASSES, WEIGHTS, read_record, record_path
from sprintdit.metrics.scores import split_score

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPOT_CHECK_IMAGES = 2000
SPOT_CHECK_ACCURACY = 0.90
RECORDED_ACCURACY = 0.92  # what the shipped weights must have measured on the whole test split
FMNIST_TEST_IMAGES = 10_000


def random_rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def covariance(eigenvalues: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    return (rotation * eigenvalues) @ rotation.T


# Frechet distance


def test_frechet_of_a_set_with_itself_is_zero():
    mu, sigma = feature_stats(torch.randn(500, 16, generator=torch.Generator().manual_seed(0)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_feature_stats_are_the_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = feature_stats(torch.from_numpy(f).float())
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, (f - f.mean(0)).T @ (f - f.mean(0)) / 49, atol=1e-6)
    with pytest.raises(UserError, match="N >= 2"):
        feature_stats(f[:1])


def test_a_shifted_mean_adds_its_squared_length():
    mu, sigma = feature_stats(np.random.default_rng(1).normal(size=(300, 8)))
    shift = np.arange(8.0)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-10)


def test_commuting_covariances_match_the_closed_form():
    """For S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T the distance is |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-10)
    q = random_rotation(12, seed=3)
    assert frechet_distance(mu1, covariance(a, q), mu2, covariance(b, q)) == pytest.approx(exact, rel=1e-10)


def test_near_singular_covariances_stay_accurate():
    """Rank-deficient covariances (dead features, fewer samples than dimensions) and eigenvalues near 0,
    whose square roots a route through the eigenvalues of S1 S2 loses or turns complex."""
    d = 64
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[:40] = 0.0  # rank 24
    b[20:50] = 0.0  # rank 34, overlapping a's null space
    b[50:52] = 1e-13  # two nearly-null directions
    a[52:56], b[52:56] = 1e4 * a[52:56], 1e4 * b[52:56]  # a dynamic range like real features' ...
    a[60:] = 1e-8  # ... in which the products a * b ~ 1e-8 are below the rounding error of S1^1/2 S2 S1^1/2
    q = random_rotation(d, seed=5)
    exact = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(np.zeros(d), covariance(a, q), np.zeros(d), covariance(b, q))
    assert math.isfinite(got) and abs(got - exact) < 1e-9 * exact
    mu, sigma = feature_stats(rng.normal(size=(10, 32)))  # rank 9
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_non_commuting_covariances_match_a_general_square_root():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = x @ x.T + np.eye(10), y @ y.T + np.eye(10)  # well conditioned, where sqrtm is reliable
    reference = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(np.zeros(10), s1, np.zeros(10), s2) == pytest.approx(reference, rel=1e-9)


def test_frechet_refuses_mismatched_or_indefinite_inputs():
    with pytest.raises(UserError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# precision, recall, density, coverage

MODES, PER_MODE, SEPARATION = 10, 200, 50.0  # mode centres on a line in the plane


def clusters(modes: list[int], seed: int, noise=torch.rand) -> torch.Tensor:
    """PER_MODE points (uniform in a unit square, or from `noise`) at each of the chosen mode centres:
    (len(modes) * PER_MODE, 2)."""
    g = torch.Generator().manual_seed(seed)
    centres = SEPARATION * torch.tensor([[float(i), 0.0] for i in modes])  # (len(modes), 2)
    points = centres[:, None] + noise(len(modes), PER_MODE, 2, generator=g)
    return points.reshape(-1, 2)


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))  # (M, N)
    inside = d <= r_real[None]
    return (
        inside.any(1).mean(),
        (d <= r_fake[:, None]).any(0).mean(),
        inside.sum() / (k * len(fake)),
        inside.any(0).mean(),
    )


def test_identical_sets_have_full_precision_recall_and_coverage():
    x = clusters(list(range(MODES)), seed=0)
    m = prdc(x, x.clone())
    assert (m.precision, m.recall, m.coverage) == (1.0, 1.0, 1.0)


def test_far_apart_sets_score_zero():
    m = prdc(clusters([0, 1, 2], seed=0), clusters([5, 6, 7], seed=1))
    assert (m.precision, m.recall, m.density, m.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_half_the_modes_gives_full_precision_and_half_recall():
    real = clusters(list(range(MODES)), seed=0)
    fake = clusters(list(range(MODES // 2)), seed=1)  # fresh samples from half the modes
    m = prdc(real, fake)
    assert m.precision > 0.97
    assert 0.47 < m.recall <= 0.5 and 0.4 < m.coverage <= 0.5


def test_same_distribution_scores_near_one():
    m = prdc(clusters(list(range(MODES)), seed=0), clusters(list(range(MODES)), seed=1))
    assert m.precision > 0.97 and m.recall > 0.97 and m.coverage > 0.85
    m = prdc(
        clusters(list(range(MODES)), seed=0, noise=torch.randn), clusters(list(range(MODES)), seed=1, noise=torch.randn)
    )
    assert 0.95 < m.density < 1.05  # density's expectation is 1 (up to edge effects, which a Gaussian has few of)


def test_prdc_matches_brute_force_for_any_batch_size():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(150, 5, generator=g), 0.8 * torch.randn(120, 5, generator=g) + 0.3
    expected = brute_force_prdc(real.double().numpy(), fake.double().numpy(), k=3)
    for batch_size in (7, 1024):
        m = prdc(real, fake, k=3, batch_size=batch_size)
        assert (m.precision, m.recall, m.density, m.coverage) == pytest.approx(expected, abs=1e-6)


def test_prdc_refuses_bad_inputs():
    with pytest.raises(UserError, match="k = 3 nearest"):
        prdc(torch.randn(3, 2), torch.randn(10, 2))
    with pytest.raises(UserError, match="width"):
        prdc(torch.randn(10, 2), torch.randn(10, 3))


# scores from logits


def test_inception_score_extremes_and_a_closed_form():
    assert inception_score(torch.zeros(6, 4)).mean == pytest.approx(1.0)
    certain = 100.0 * torch.eye(4).repeat(3, 1)  # every class used equally, each sample certain
    assert inception_score(certain).mean == pytest.approx(4.0)
    assert inception_score(100.0 * torch.eye(4)[[2, 2, 2]]).mean == pytest.approx(1.0)
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # p(y) = (1/2, 1/2)
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert inception_score(p.log()).mean == pytest.approx(math.exp(kl), rel=1e-6)


def test_inception_score_averages_consecutive_splits_as_adm():
    """Two splits, each using one class only, score 1 each; one split over both sees two classes used equally."""
    certain = 100.0 * torch.eye(2)[[0, 0, 1, 1]]  # (4, 2): the first two samples class 0, the last two class 1
    halves = inception_score(certain, split_size=2)
    assert (halves.mean, halves.std, halves.splits) == (pytest.approx(1.0), pytest.approx(0.0), 2)
    assert inception_score(certain, split_size=0).mean == pytest.approx(2.0)
    assert inception_score(certain, split_size=4).mean == pytest.approx(2.0)
    remainder = inception_score(certain, split_size=3)  # splits of 3 and 1 samples, as ADM's loop cuts them
    assert remainder.splits == 2 and remainder.mean == pytest.approx((split_score(certain[:3]) + 1.0) / 2)
    with pytest.raises(UserError, match="split size"):
        inception_score(certain, split_size=-1)


def test_class_agreement_counts_argmax_hits():
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert class_agreement(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    with pytest.raises(UserError, match="labels"):
        class_agreement(logits, torch.tensor([0, 1]))


# the shipped Fashion-MNIST classifier


def test_shipped_classifier_matches_its_record():
    record = read_record()
    assert sha256(WEIGHTS) == record["sha256"]
    assert record["test_accuracy"] >= RECORDED_ACCURACY and record["test_images"] == FMNIST_TEST_IMAGES
    model = load_classifier()
    features, logits = model.features_and_logits(torch.zeros(2, 1, 32, 32))
    assert features.shape == (2, FEATURE_DIM) and logits.shape == (2, NUM_CLASSES)
    assert not model.training
    with pytest.raises(UserError, match="takes images"):
        classify(model, torch.zeros(2, 3, 32, 32))


def test_classifier_loader_refuses_missing_or_altered_weights(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_classifier(tmp_path / "none.safetensors")
    copy = tmp_path / WEIGHTS.name
    shutil.copy(WEIGHTS, copy)
    with pytest.raises(UserError, match="record .* is missing"):
        load_classifier(copy)
    shutil.copy(record_path(WEIGHTS), record_path(copy))
    load_classifier(copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_classifier(copy)


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST_ROOT}")
def test_classifier_accuracy_on_the_test_split():
    data = FashionMNIST(FMNIST_ROOT, "test")
    x, y = data.load(torch.arange(SPOT_CHECK_IMAGES))
    _, logits = classify(load_classifier(), x)
    assert class_agreement(logits, y) >= SPOT_CHECK_ACCURACY
