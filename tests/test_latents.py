"""The latent (ImageNet) path on tiny stand-ins: a 2-block AutoencoderKL and a 1-block DINOv2 with random weights."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomised, tiny_vae
from PIL import Image

from sprintdit.draws import Draws
from sprintdit.cli import main
from sprintdit.config import CONFIG_DIR, load_config
from sprintdit.data import LatentDataset, posterior_sample
from sprintdit.distributed import Dist
from sprintdit.errors import UserError
from sprintdit.metrics.dinov2 import DINOv2ViT, ViTConfig
from sprintdit.images import adm_center_crop, read_image
from sprintdit.prepare import FeatureEncoder, PrepareConfig, prepare
from sprintdit.training import Trainer
from sprintdit.training.resolve import resolve_run_config
from sprintdit.vae import encode, load_vae

RESOLUTION = 32  # pixels; the tiny VAE halves once -> 16x16x4 latents -> 8x8 tokens at patch 2
LATENT = (4, 16, 16)
TINY_VIT = ViTConfig(dim=32, depth=1, heads=2, pretrain_grid=4)
SIZES = [(80, 100), (40, 33), (64, 64)]  # (W, H): halving, a plain resize, no resize


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae"), RESOLUTION, LATENT[0])


@pytest.fixture
def image_tree(tmp_path):
    """Two classes, three images each of different sizes, and one file that is not an image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "dog" / "1_broken.png").write_bytes(b"not a png")
    return root


def tiny_prepare(image_tree, vae_dir, out, **kw) -> PrepareConfig:
    return PrepareConfig(
        images=str(image_tree),
        out=str(out),
        vae=str(vae_dir),
        resolution=RESOLUTION,
        shard_size=2,
        batch_size=2,
        progress=False,
        **kw,
    )


def tiny_features() -> FeatureEncoder:
    return FeatureEncoder(randomised(DINOv2ViT(TINY_VIT)), "tiny", "random")


def test_adm_center_crop_halves_then_resizes_then_crops():
    stripes = np.zeros((200, 300, 3), dtype=np.uint8)  # (H, W): red | green | blue thirds
    stripes[:, :100, 0] = stripes[:, 100:200, 1] = stripes[:, 200:, 2] = 255
    out = adm_center_crop(Image.fromarray(stripes), 64)
    assert out.size == (64, 64)
    arr = np.asarray(out).astype(int)
    # 300x200 -> BOX half 150x100 -> BICUBIC 96x64 -> centre 64 columns (16..80 of 96): green in the middle third
    assert (arr[:, 26:38, 1] > 250).all() and (arr[:, 26:38, [0, 2]] < 5).all()
    assert arr[:, 0, 0].mean() > 200 and arr[:, -1, 2].mean() > 200  # the crop's edges reach into red and blue


def test_prepare_writes_shards_and_manifest_and_lists_unreadable_images(image_tree, vae_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    code = main(
        [
            "prepare",
            "--images",
            str(image_tree),
            "--out",
            str(out),
            "--vae",
            str(vae_dir),
            "--resolution",
            str(RESOLUTION),
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0 and "6 images in 4 shards" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["latent_shape"] == list(LATENT) and manifest["resolution"] == RESOLUTION
    assert manifest["classes"] == {"cat": 0, "dog": 1} and manifest["dinov2"] is None
    assert manifest["vae"]["scaling_factor"] == 0.18215 and manifest["vae"]["downsample"] == 2  # from the VAE's config
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1, 1]  # shard 2 held dog/1.png and dog/1_broken.png
    (skipped,) = manifest["skipped"]
    assert skipped["path"].endswith("1_broken.png") and "UnidentifiedImageError" in skipped["reason"]
    # the stored mean and std are the VAE's unscaled posterior of the ADM-cropped image
    from safetensors.torch import load_file

    shard = load_file(out / "shard_00001.safetensors")
    vae = load_vae(vae_dir)
    image = read_image(image_tree / "cat" / "2.png", RESOLUTION).float() / 127.5 - 1
    mean, std = encode(vae, image[None])
    assert shard["labels"].tolist() == [0, 1] and shard["mean"].dtype == torch.float32
    torch.testing.assert_close(shard["mean"][0], mean[0])
    torch.testing.assert_close(shard["std"][0], std[0])


def test_resume_reencodes_only_the_missing_shard(image_tree, vae_dir, tmp_path):
    out = tmp_path / "latents"
    first = prepare(tiny_prepare(image_tree, vae_dir, out))
    assert first.encoded == [0, 1, 2, 3] and not first.kept
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    manifest = (out / "manifest.json").read_text()
    (out / "shard_00003.safetensors").unlink()  # interrupted before the last shard was written
    again = prepare(tiny_prepare(image_tree, vae_dir, out))
    assert again.encoded == [3] and again.kept == [0, 1, 2]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    assert all(after[name] == before[name] for name in before if name != "shard_00003.safetensors")
    assert (out / "manifest.json").read_text() == manifest  # the same bytes re-encoded


def test_ranks_encode_interleaved_shards_and_rank0_writes_the_manifest(image_tree, vae_dir, tmp_path, monkeypatch):
    import sprintdit.prepare as prep

    out = tmp_path / "latents"
    monkeypatch.setattr(prep, "barrier", lambda d, what: None)  # one process plays each rank in turn
    monkeypatch.setattr(prep, "joined", lambda device: Dist(1, 2, device=device))
    second = prepare(tiny_prepare(image_tree, vae_dir, out))
    assert second.encoded == [1, 3] and second.manifest is None and not (out / "manifest.json").exists()
    monkeypatch.setattr(prep, "joined", lambda device: Dist(0, 2, device=device))
    first = prepare(tiny_prepare(image_tree, vae_dir, out))
    assert first.encoded == [0, 2] and json.loads(first.manifest.read_text())["count"] == 6


def test_resume_with_other_settings_is_refused(image_tree, vae_dir, tmp_path):
    out = tmp_path / "latents"
    prepare(tiny_prepare(image_tree, vae_dir, out))
    with pytest.raises(UserError, match="other settings"):
        prepare(tiny_prepare(image_tree, vae_dir, out), tiny_features())


def test_corrupt_shard_is_named_at_open(image_tree, vae_dir, tmp_path):
    out = tmp_path / "latents"
    prepare(tiny_prepare(image_tree, vae_dir, out))
    LatentDataset(out, RESOLUTION)  # intact: opens
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        LatentDataset(out, RESOLUTION)
    message = str(error.value)
    assert "shard_00001.safetensors" in message and "corrupt" in message and "\n" not in message
    with pytest.raises(UserError, match="prepared at 32"):
        LatentDataset(out, 64)
    assert prepare(tiny_prepare(image_tree, vae_dir, out)).encoded == [1]  # prepare repairs it
    LatentDataset(out, RESOLUTION)


def test_latent_batches_are_scaled_posterior_samples(image_tree, vae_dir, tmp_path):
    out = tmp_path / "latents"
    prepare(tiny_prepare(image_tree, vae_dir, out), tiny_features())
    data = LatentDataset(out, RESOLUTION)
    assert (len(data), data.channels, data.resolution, data.num_classes) == (6, LATENT[0], LATENT[1:], 2)
    assert data.feature_shape == (64, TINY_VIT.dim)  # 8x8 tokens: latent 16 / patch 2
    from safetensors.torch import load_file

    two, three = load_file(out / "shard_00002.safetensors"), load_file(out / "shard_00003.safetensors")
    batch = data.load(torch.tensor([4, 0, 5]))  # shards hold 2, 2, 1, 1 images
    torch.testing.assert_close(batch.x[0], two["mean"][0] * 0.18215)
    torch.testing.assert_close(batch.std[2], three["std"][0] * 0.18215)
    assert batch.y.tolist() == [1, 0, 1] and batch.features.shape == (3, 64, TINY_VIT.dim)
    torch.testing.assert_close(batch.features[2], three["dinov2"][0].float())
    g = torch.Generator().manual_seed(3)
    x = posterior_sample(batch, Draws(g))
    noise = torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, batch.x + batch.std * noise)  # a fresh sample from the given generator
    assert not torch.equal(posterior_sample(batch, Draws(g)), x)


def latent_run(out, **extra) -> list[str]:
    return [
        f"data.root={out}",
        f"data.resolution={RESOLUTION}",
        "model.preset=SiT-Nano/2",
        "model.hidden_size=32",
        "model.sprint.encoder_depth=1",
        "model.sprint.decoder_depth=1",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=3",
        "train.grid_rows=2",
        "train.grid_columns=2",
        "train.precision=fp32",
        "data.num_workers=0",
        "stages=[{name: pre, steps: 2, lr: 1.0e-3, mask_ratio: 0.75}, {name: ft, steps: 1, lr: 1.0e-3, mask_ratio: 0}]",
        "sample.steps=2",
        "sample.sampler=euler",
        "sample.batch_size=4",
        "train.device=cpu",
        *[f"{k}={v}" for k, v in extra.items()],
    ]


def test_prepare_train_sample_decode_end_to_end(image_tree, vae_dir, tmp_path, capsys):
    latents = tmp_path / "latents"
    prepare(tiny_prepare(image_tree, vae_dir, latents), tiny_features())
    run = tmp_path / "run"
    # batches (and features) via a worker
    args = latent_run(latents, **{"model.repa.depth": 2, "model.repa.hidden": 16, "data.num_workers": 1})
    assert main(["train", "--config", "imagenet256_sprint_repa", "--out", str(run), "--no-progress", *args]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.data.vae == str(Path(vae_dir).resolve()) and saved.model.repa.dim == TINY_VIT.dim
    with Image.open(run / "samples" / "step_00000003.png") as grid:  # decoded: 2x2 RGB images of 32 pixels
        assert grid.mode == "RGB" and min(grid.size) > 2 * RESOLUTION
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--labels",
                "0,1",
                "--guidance",
                "pdg",
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    npz = np.load(tmp_path / "s" / "pdg_euler2_s3.npz")
    assert npz["arr_0"].shape == (2, RESOLUTION, RESOLUTION, 3) and npz["arr_1"].tolist() == [0, 1]


def test_latent_training_resumes_exactly(image_tree, vae_dir, tmp_path):
    latents = tmp_path / "latents"
    prepare(tiny_prepare(image_tree, vae_dir, latents))
    cfg = load_config(CONFIG_DIR / "imagenet256_sprint.yaml", latent_run(latents, **{"train.sample_every": 0}))
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    Trainer(cfg, tmp_path / "b", progress=False).fit(stop_at=1)
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    assert resumed.step == 1
    resumed.fit()
    assert all(
        torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values())
    )
    # the trainer trains on a posterior sample: with the same draws (the same step), a zero std gives another loss
    batch = straight._dataset.load(torch.arange(4))
    sampled = straight.train_step(batch, cfg.stages[1])
    assert straight.train_step(batch._replace(std=torch.zeros_like(batch.std)), cfg.stages[1]) != sampled


@pytest.mark.parametrize(
    "name,latent_side",
    [
        ("imagenet256_sprint", 32),
        ("imagenet256_sprint_repa", 32),
        ("imagenet512_sprint", 64),
        ("imagenet256_dense", 32),
    ],
)
def test_shipped_imagenet_configs_resolve(name, latent_side):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    tokens = (latent_side // 2) ** 2
    data = SimpleNamespace(
        resolution=(latent_side, latent_side),
        channels=4,
        num_classes=1000,
        feature_shape=(tokens, 768),
        vae_path="/vae",
    )
    run = resolve_run_config(cfg, data)
    m = run.model
    assert (m.hidden_size, m.depth, m.patch_size, m.sprint.encoder_depth, m.sprint.decoder_depth) == (1152, 28, 2, 2, 2)
    assert run.data.vae == "/vae" and run.train.precision == "bf16" and run.train.ema_decay == 0.9999
    if name != "imagenet256_dense":
        pre, fine = run.stages
        assert (pre.mask_ratio, pre.lr, pre.batch_size or run.train.batch_size) == (0.75, 1e-4, 256)
        assert (fine.mask_ratio, fine.batch_size, fine.warmup_steps, fine.warmup_start) == (0.0, 1024, 5000, 0.01)
        assert fine.lr == (1.5e-4 if "512" in name else 2e-4)
    assert m.repa.dim == (768 if name.endswith("repa") else None)


def test_repa_needs_matching_stored_features():
    cfg = load_config(CONFIG_DIR / "imagenet256_sprint_repa.yaml")
    data = SimpleNamespace(resolution=(32, 32), channels=4, num_classes=1000, feature_shape=None, vae_path="/vae")
    with pytest.raises(UserError, match="--dinov2-weights"):
        resolve_run_config(cfg, data)
    data.feature_shape = (64, 768)
    with pytest.raises(UserError, match="64 tokens but the model's token grid is 16x16"):
        resolve_run_config(cfg, data)


def test_missing_vae_names_what_to_download(tmp_path):
    with pytest.raises(UserError, match="download stabilityai/sd-vae-ft-ema"):
        load_vae(tmp_path)


def test_clips_prepare_frame_by_frame_then_train_and_sample_video_latents(vae_dir, tmp_path, capsys):
    """prepare --clips: every frame through the image VAE (grey clips repeated to RGB); a video model trains on the
    (C, F, h, w) latents and its samples decode frame by frame."""
    rng = np.random.default_rng(0)
    clips = tmp_path / "clips"
    for name in ("a", "b"):
        (clips / name).mkdir(parents=True)
        for i in range(2):
            np.save(clips / name / f"{i}.npy", rng.integers(0, 256, (4, RESOLUTION, RESOLUTION, 1), dtype=np.uint8))
    latents = tmp_path / "latents"
    assert (
        main(
            [
                "prepare",
                "--images",
                str(clips),
                "--clips",
                "--vae",
                str(vae_dir),
                "--out",
                str(latents),
                "--resolution",
                str(RESOLUTION),
                "--batch-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["latent_shape"] == [LATENT[0], 4, *LATENT[1:]] and manifest["count"] == 4
    data = LatentDataset(latents, RESOLUTION)
    assert data.resolution == (4, *LATENT[1:])
    vae = load_vae(vae_dir, "cpu")
    clip = (
        torch.from_numpy(np.load(clips / "b" / "1.npy")).permute(3, 0, 1, 2).expand(3, -1, -1, -1).float() / 127.5 - 1
    )  # (3, F, R, R)
    mean, _ = encode(vae, clip.movedim(1, 0))  # the frames one by one as images
    batch = data.load(torch.tensor([3]))
    torch.testing.assert_close(batch.x[0] / manifest["vae"]["scaling_factor"], mean.movedim(0, 1), rtol=1e-4, atol=1e-4)
    assert batch.y.tolist() == [1]
    run = tmp_path / "run"
    args = latent_run(latents, **{"model.patch_size_t": 2, "train.grid_columns": 1})
    assert main(["train", "--config", "imagenet256_sprint", "--out", str(run), "--no-progress", *args]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--labels",
                "0,1",
                "--guidance",
                "cfg",
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    npz = np.load(tmp_path / "s" / "cfg_euler2_s3.npz")
    assert (
        npz["arr_0"].shape == (2, 4, RESOLUTION, RESOLUTION, 3)
        and (tmp_path / "s" / "cfg_euler2_s3_gifs" / "00001.gif").is_file()
    )


def test_posterior_noise_of_a_ranks_rows_is_the_one_process_noise():
    """A rank's batch carries its rows of the global batch, so its posterior samples are those rows of one process's."""
    from sprintdit.data import Batch
    from sprintdit.distributed import rank_rows

    x, std = torch.randn(8, 2, 3, 3), torch.rand(8, 2, 3, 3)
    whole = posterior_sample(Batch(x, torch.zeros(8), std), Draws.for_step(0, 5))
    for rank in range(2):
        rows = rank_rows(8, 2, (rank, 2))  # a block of each of 2 micro-batches
        part = posterior_sample(Batch(x[rows], torch.zeros(4), std[rows], rows=rows), Draws.for_step(0, 5, (rank, 2)))
        assert torch.equal(part, whole[rows])
