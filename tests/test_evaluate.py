import json

import numpy as np
import pytest
import torch

from sprintdit.cli import main
from sprintdit.config import EvalConfig
from sprintdit.errors import UserError
from sprintdit.files import sha256_file as sha256
from sprintdit.evaluate import (
    Evaluator,
    Features,
    NpzBatch,
    Reference,
    choose_networks,
    fmnist_reference,
    load_reference,
    score,
)
from sprintdit.metrics import feature_stats, frechet_distance

TINY = [
    "model.preset=SiT-Nano/8",
    "train.batch_size=4",
    "train.log_every=1",
    "train.sample_every=0",
    "stages=[{name: pre, steps: 1, mask_ratio: 0.75}, {name: ft, steps: 1, mask_ratio: 0}]",
    "sample.steps=2",
]


class PixelFeatures:
    """A stand-in feature network: the mean intensity of 4 image quadrants, in [0, 1]."""

    name, resize, weights_sha256 = "fmnist", "none", "quadrant means"

    def __call__(self, images):
        x = images.float() / 255
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return Features(torch.stack([q.mean(dim=(1, 2, 3)) for q in quads], dim=1))


def random_images(n, seed, channels=1, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_npz_batches_in_the_adm_layout(tmp_path):
    images = random_images(5, 0)
    np.savez(tmp_path / "a.npz", images, np.arange(5))
    batch = NpzBatch(tmp_path / "a.npz")
    x, y = batch.images(), batch.labels()
    assert (
        x.shape == (5, 1, 8, 8)
        and x.dtype == torch.uint8
        and torch.equal(x[2, 0], torch.from_numpy(images[2, :, :, 0]))
    )
    assert y.tolist() == [0, 1, 2, 3, 4]
    blocks = list(batch.image_blocks(2))  # streamed: blocks of 2, 2 and 1 images, in order
    assert [len(b) for b in blocks] == [2, 2, 1] and torch.equal(torch.cat(blocks), x)
    np.savez_compressed(tmp_path / "z.npz", images)  # a compressed member streams as well
    assert torch.equal(torch.cat(list(NpzBatch(tmp_path / "z.npz").image_blocks(3))), x)
    np.savez(tmp_path / "b.npz", images)
    assert NpzBatch(tmp_path / "b.npz").labels() is None  # labels are optional
    for bad in (images.astype(np.float32), images[..., 0]):
        np.savez(tmp_path / "c.npz", bad)
        with pytest.raises(UserError, match="arr_0 must be uint8 images"):
            NpzBatch(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", images, np.arange(4))
    with pytest.raises(UserError, match="one label per image"):
        NpzBatch(tmp_path / "d.npz").labels()
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"e.npz is not an npz file .* starts with b'not a zi'"):
        NpzBatch(tmp_path / "e.npz")
    (tmp_path / "f.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:40])  # a zip cut short
    with pytest.raises(UserError, match="not a readable npz"):
        NpzBatch(tmp_path / "f.npz")


def test_reference_statistics_take_precedence_over_its_images(tmp_path):
    net, real = PixelFeatures(), random_images(200, 1)
    feats = net(torch.from_numpy(real).permute(0, 3, 1, 2))
    mu, sigma = feature_stats(feats.main)
    np.savez(tmp_path / "images.npz", real)
    np.savez(tmp_path / "stats.npz", fmnist_mu=mu + 1.0, fmnist_sigma=sigma)  # shifted by 1 in each of 4 dims
    np.savez(tmp_path / "both.npz", real, fmnist_mu=mu + 1.0, fmnist_sigma=sigma)
    from_images = score(feats, "fmnist", load_reference(tmp_path / "images.npz", [net]), None)
    assert abs(from_images["fid"]) < 1e-9 and from_images["precision"] == 1.0 and from_images["recall"] == 1.0
    from_stats = score(feats, "fmnist", load_reference(tmp_path / "stats.npz", [net]), None)
    assert from_stats["fid"] == pytest.approx(4.0) and "precision" not in from_stats  # no images: no precision/recall
    both = score(feats, "fmnist", load_reference(tmp_path / "both.npz", [net]), None)
    assert both["fid"] == pytest.approx(4.0) and both["recall"] == 1.0
    np.savez(tmp_path / "none.npz", other=np.zeros(3))
    with pytest.raises(UserError, match="neither images"):
        load_reference(tmp_path / "none.npz", [net])


def test_adm_reference_keys_feed_inception_fid_and_sfid():
    ref = Reference("adm", stats={"inception": {"main": (np.zeros(3), np.eye(3)), "spatial": (np.ones(2), np.eye(2))}})
    feats = Features(
        torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) + 2,
        spatial=torch.ones(500, 2) * 3 + torch.randn(500, 2) * 1e-3,
    )
    out = score(feats, "inception", ref, None)
    assert out["fid"] == pytest.approx(frechet_distance(*feature_stats(feats.main), np.zeros(3), np.eye(3)))
    assert out["sfid"] == pytest.approx(8.0 + 2.0, rel=1e-2)  # |3 - 1|^2 in 2 dims, plus tr(I) with a ~0 covariance


def test_auto_picks_the_network_by_image_shape():
    assert choose_networks(EvalConfig(), (1, 32, 32)) == ["fmnist"]
    assert choose_networks(EvalConfig(), (3, 256, 256)) == ["inception"]
    assert choose_networks(EvalConfig(dinov2_weights="x.pth"), (3, 256, 256)) == ["inception", "dinov2"]
    assert choose_networks(EvalConfig(features=["dinov2", "dinov2"]), (1, 32, 32)) == ["dinov2"]


def test_fmnist_reference_is_cached(fmnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    evaluator = Evaluator(EvalConfig(), (1, 32, 32), torch.device("cpu"), str(fmnist_dir))
    first = evaluator.ref.features["fmnist"].main
    assert first.shape == (20, 256) and len(list((tmp_path / "cache").glob("fmnist_test_*.npz"))) == 1
    again = fmnist_reference(fmnist_dir, evaluator.networks[0])
    assert "cached" in again.source and torch.equal(again.features["fmnist"].main, first)
    # the test split scored against itself: FID ~0, every sample agrees with its label only if classified so
    from sprintdit.fashion_mnist import FashionMNIST

    data = FashionMNIST(fmnist_dir, split="test")
    results = evaluator(data.images, data.labels)["metrics"]["fmnist"]
    assert abs(results["fid"]) < 1e-6 and results["precision"] == 1.0 and results["recall"] == 1.0
    logits = evaluator.networks[0](data.images).logits
    assert results["class_agreement"] == pytest.approx((logits.argmax(1) == data.labels).double().mean().item())


def test_evaluate_checkpoint_then_its_samples_agree(fmnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "fashion_mnist_sprint",
                "--out",
                str(run),
                "--no-progress",
                f"data.root={fmnist_dir}",
                *TINY,
            ]
        )
        == 0
    )
    args = [
        "evaluate",
        "--checkpoint",
        str(run),
        "--num-samples",
        "12",
        "--guidance",
        "cfg",
        "--scale",
        "3",
        "--no-progress",
        "--save-samples",
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "fmnist" in out and "class_agreement" in out
    assert "warning: fid from 12 samples" in err  # too few for a trustworthy FID, and the user is told
    written = run / "checkpoints" / "step_00000002" / "eval_cfg_euler2_s3_n12.json"
    result = json.loads(written.read_text())
    assert (
        result["num_samples"] == 12
        and 0.0 <= result["metrics"]["fmnist"]["class_agreement"] <= 1.0
        and result["metrics"]["fmnist"]["fid"] > 0
    )
    batch = np.load(written.with_suffix(".npz"))
    assert batch["arr_0"].shape == (12, 32, 32, 1) and batch["arr_1"].tolist() == [i % 10 for i in range(12)]
    # the same images scored from the saved batch give the same numbers
    assert main(["evaluate", "--samples", str(written.with_suffix(".npz")), "--data-root", str(fmnist_dir)]) == 0
    again = json.loads(written.with_suffix(".eval.json").read_text())
    assert again["metrics"]["fmnist"] == pytest.approx(result["metrics"]["fmnist"], rel=1e-5)
    # the raw weights' scores are written beside the EMA's, not over them
    assert main([*args[:-1], "--no-ema"]) == 0
    raw = json.loads(written.with_name("eval_cfg_euler2_s3_n12_raw.json").read_text())
    setting = json.loads(written.read_text())["provenance"]["setting"]
    assert raw["provenance"]["setting"]["ema"] is False and setting["ema"] is True
    assert setting["sample"]["sampler"] == "euler" and setting["nfe"] == 2 * 2  # two steps, both CFG halves
    assert setting["seed_start"] == 0 and setting["num_seeds"] == 12


def test_training_logs_metrics_with_flops(fmnist_dir, tmp_path, monkeypatch):
    from sprintdit.flops import train_flops

    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "fashion_mnist_sprint",
                "--out",
                str(run),
                "--no-progress",
                f"data.root={fmnist_dir}",
                *TINY,
                "model.depth=6",
                "eval.every=1",
                "eval.num_samples=10",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fmnist/fid" in r]
    assert [r["step"] for r in evals] == [1, 2]
    from sprintdit.config import from_yaml_text

    cfg = from_yaml_text((run / "config.yaml").read_text(), "run")
    assert [r["train_flops"] for r in evals] == [train_flops(cfg, 1), train_flops(cfg, 2)]
    # the second step is dense: dearer than the masked first
    assert evals[1]["train_flops"] > 2 * evals[0]["train_flops"] > 0


def test_evaluating_along_a_run_leaves_its_training_unchanged(fmnist_dir, tmp_path, monkeypatch):
    """Studies evaluate at checkpoints along each run; sampling must not draw from the training's randomness."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    final = {}
    for every in (0, 1):
        run = tmp_path / f"every{every}"
        assert (
            main(
                [
                    "train",
                    "--config",
                    "fashion_mnist_sprint",
                    "--out",
                    str(run),
                    "--no-progress",
                    f"data.root={fmnist_dir}",
                    *TINY,
                    "model.depth=6",
                    f"eval.every={every}",
                    "eval.num_samples=10",
                ]
            )
            == 0
        )
        final[every] = load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    assert (tmp_path / "every1" / "metrics.jsonl").read_text().count("fmnist/fid") == 2  # it did evaluate, twice
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate"], "either --checkpoint"),
        (["evaluate", "--samples", "nowhere.npz"], "does not exist"),
        (["evaluate", "--samples", "x.npz", "--checkpoint", "r"], "either --checkpoint"),
    ],
)
def test_evaluate_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_wrong_image_shape_for_the_classifier_is_refused_early(tmp_path, capsys):
    np.savez(tmp_path / "rgb.npz", random_images(4, 0, channels=3))
    assert main(["evaluate", "--samples", str(tmp_path / "rgb.npz"), "--features", "fmnist"]) == 2
    assert "scores 1x32x32 images" in capsys.readouterr().err


def test_evaluate_rgb_batches_with_inception_and_dinov2(tmp_path, monkeypatch, capsys):
    from conftest import randomised

    from sprintdit.metrics import dinov2, inception

    monkeypatch.setitem(dinov2.PRESETS, "ViT-tiny/14", dinov2.ViTConfig(dim=32, depth=1, heads=2, pretrain_grid=4))
    torch.save(randomised(inception.InceptionV3FID()).state_dict(), tmp_path / "inception.pth")
    torch.save(randomised(dinov2.DINOv2ViT(dinov2.PRESETS["ViT-tiny/14"])).state_dict(), tmp_path / "dinov2.pth")
    samples, other = random_images(6, 0, channels=3, size=16), random_images(6, 1, channels=3, size=16)
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "same.npz", samples)
    np.savez(tmp_path / "other.npz", np.concatenate([other, 255 - other]))
    weights = [
        "--inception-weights",
        str(tmp_path / "inception.pth"),
        "--dinov2-weights",
        str(tmp_path / "dinov2.pth"),
        "--dinov2-model",
        "ViT-tiny/14",
    ]
    results = {}
    for ref in ("same", "other"):
        assert (
            main(
                [
                    "evaluate",
                    "--samples",
                    str(tmp_path / "samples.npz"),
                    "--ref",
                    str(tmp_path / f"{ref}.npz"),
                    *weights,
                ]
            )
            == 0
        )
        (tmp_path / "samples.eval.json").rename(tmp_path / f"{ref}.eval.json")
        results[ref] = json.loads((tmp_path / f"{ref}.eval.json").read_text())["metrics"]
    assert set(results["same"]["inception"]) == {"fid", "sfid", "precision", "recall", "is", "is_std"} and set(
        results["same"]["dinov2"]
    ) == {"fdd"}
    for net, frechet in (("inception", "fid"), ("inception", "sfid"), ("dinov2", "fdd")):
        assert abs(results["same"][net][frechet]) < 1e-6 * results["other"][net][frechet]  # a set against itself: 0
    assert results["same"]["inception"]["precision"] == 1.0 and results["same"]["inception"]["is"] >= 1.0
    # every score says how it was made, and only scores made alike compare
    same = json.loads((tmp_path / "same.eval.json").read_text())["provenance"]
    assert same["convention"]["networks"]["dinov2"]["resize"] == "pillow-bicubic-uint8"
    assert same["convention"]["networks"]["inception"] == {
        "weights_sha256": sha256(tmp_path / "inception.pth"),
        "resize": "tf",
    }
    assert same["convention"]["reference"]["sha256"] == sha256(tmp_path / "same.npz")
    assert same["convention"]["is_split_size"] == 5000 and same["setting"]["samples_sha256"] == sha256(
        tmp_path / "samples.npz"
    )
    assert same["versions"]["torch"] == torch.__version__
    capsys.readouterr()
    assert main(["evaluate", "--compare", str(tmp_path / "same.eval.json"), str(tmp_path / "other.eval.json")]) == 2
    err = capsys.readouterr().err
    assert "different conventions: reference.path" in err and err.count("\n") == 1
    resplit = json.loads((tmp_path / "same.eval.json").read_text())
    resplit["provenance"]["convention"]["is_split_size"] = 0
    resplit["metrics"]["inception"]["fid"] += 1.0
    (tmp_path / "resplit.json").write_text(json.dumps(resplit))
    assert main(["evaluate", "--compare", str(tmp_path / "same.eval.json"), str(tmp_path / "resplit.json")]) == 2
    assert "is_split_size is 5000 vs 0" in capsys.readouterr().err
    resplit["provenance"]["convention"]["is_split_size"] = 5000
    resplit["provenance"]["setting"]["samples"] = "elsewhere.npz"
    (tmp_path / "resplit.json").write_text(json.dumps(resplit))
    assert main(["evaluate", "--compare", str(tmp_path / "same.eval.json"), str(tmp_path / "resplit.json")]) == 0
    table = capsys.readouterr().out
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("inception/fid ")] == ["1.0000"]
    assert any(line.startswith("setting.samples ") and line.endswith("differs") for line in table.splitlines())
    # without weights: one line naming the option
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "same.npz")]) == 2
    err = capsys.readouterr().err
    assert "--inception-weights" in err and err.count("\n") == 1


def test_demo_scores_both_guidances(fmnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--no-progress",
                "--per-class",
                "2",
                f"data.root={fmnist_dir}",
                *TINY,
                "eval.num_samples=20",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "class_agreement" in printed and "PDG scale" in printed and "CFG scale" in printed
    results = json.loads((out / "demo.json").read_text())
    for guidance in ("pdg", "cfg"):
        assert (
            results[guidance]["num_samples"] == 20
            and 0 <= results[guidance]["metrics"]["fmnist"]["class_agreement"] <= 1
        )
        assert (out / f"demo_{guidance}.png").is_file()
    # fewer than 10 x 10
    assert main(["demo", "--out", str(tmp_path / "d2"), f"data.root={fmnist_dir}", *TINY, "eval.num_samples=10"]) == 2


def test_written_reference_scores_like_its_images(fmnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPRINTDIT_CACHE", str(tmp_path / "cache"))
    from sprintdit.fashion_mnist import FashionMNIST

    real = FashionMNIST(fmnist_dir, split="train").images  # (40, 1, 32, 32) uint8
    np.savez(tmp_path / "real.npz", real[:30].permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "fake.npz", real[30:].permute(0, 2, 3, 1).numpy(), np.arange(10))
    assert main(["evaluate", "--samples", str(tmp_path / "real.npz"), "--write-ref", str(tmp_path / "ref.npz")]) == 0
    ref = NpzBatch(tmp_path / "ref.npz")
    assert set(ref.keys) == {"arr_0", "fmnist_mu", "fmnist_sigma"} and ref.array("fmnist_sigma").shape == (256, 256)
    scores = {}
    for name in ("real", "ref"):
        assert main(["evaluate", "--samples", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / f"{name}.npz")]) == 0
        scores[name] = json.loads((tmp_path / "fake.eval.json").read_text())["metrics"]["fmnist"]
    assert scores["ref"] == pytest.approx(scores["real"], rel=1e-6)
    assert main(["evaluate", "--checkpoint", "x", "--write-ref", "y.npz"]) == 2
