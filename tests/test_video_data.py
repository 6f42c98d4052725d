"""Video data and files: moving Fashion-MNIST, clip folders, GIF / npz / frame-strip writers, the clip scores,
and a two-stage video run that resumes exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from sprintdit.config import load_config
from sprintdit.data import ClipFolder
from sprintdit.demo import stage_rates
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops
from sprintdit.images import STRIP_GAP, frame_strips, save_gif, save_samples
from sprintdit.moving import CELL, MAX_SPEED, TRAVEL, MovingFashionMNIST, bounce, garment_windows, path_residual
from sprintdit.training import Trainer


def test_moving_fashion_mnist_is_deterministic_and_moves_at_constant_velocity(fmnist_dir):
    a, b = MovingFashionMNIST(fmnist_dir, frames=6), MovingFashionMNIST(fmnist_dir, frames=6)
    xa, ya = a.load(torch.arange(12))
    xb, yb = b.load(torch.arange(12))
    assert xa.shape == (12, 1, 6, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, MovingFashionMNIST(fmnist_dir, frames=6, seed=1).load(torch.arange(12))[0])
    for i in range(12):
        garment, start, velocity = a.item(i)
        corners = a.corners(i)
        assert ya[i] == a.labels[garment] and 0 < np.abs(velocity).max() <= MAX_SPEED
        assert (corners >= 0).all() and (corners <= TRAVEL).all()
        for f, (r, c) in enumerate(corners):  # the garment, unchanged, at its corner; black elsewhere
            frame = (xa[i, 0, f] + 1) / 2
            torch.testing.assert_close(frame[r : r + CELL, c : c + CELL], a.garments[garment])
            assert frame.sum() == pytest.approx(a.garments[garment].sum().item(), rel=1e-5)
    # reflection: never leaving [0, travel], and a straight line while inside it
    assert bounce(np.array([14.0]), np.array([3.0]), 4).tolist() == [[14.0, 15.0, 12.0, 9.0]] if TRAVEL == 16 else True


def test_path_residual_is_zero_for_bounces_and_positive_for_jumps():
    start, velocity = np.array([[3.0, 10.0]]), np.array([[2.5, -1.75]])
    # (1, 8, 2) centroid offset
    path = np.stack([bounce(start[:, 0], velocity[:, 0], 8), bounce(start[:, 1], velocity[:, 1], 8)], axis=-1) + 7.5
    assert path_residual(path)[0] == pytest.approx(0.0, abs=1e-9)
    jumpy = path.copy()
    jumpy[0, ::2, 0] += 5.0
    assert path_residual(jumpy)[0] > 0.5  # 5 px jumps on every other frame of one axis (the other fits exactly)


def test_garment_window_finds_the_garment():
    frames = -torch.ones(2, 32, 32)
    frames[0, 5:21, 11:27] = 1.0  # a full 16x16 garment at (5, 11)
    frames[1, 16:32, 0:10] = 1.0  # a narrow one in the corner
    windows, centroids = garment_windows(frames)
    assert torch.equal(windows[0], torch.ones(16, 16)) and torch.allclose(centroids[0], torch.tensor([12.5, 18.5]))
    assert windows[1].shape == (16, 16) and bool((windows[1] == 1).sum() == 16 * 10)


def test_gif_and_npz_round_trip(tmp_path):
    clips = (torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5) % 17) / 8 - 1  # (N, C, F, H, W)
    expected = ((clips.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    path = save_gif(clips[1], tmp_path / "clip.gif")
    with Image.open(path) as gif:
        read = []
        for f in range(gif.n_frames):
            gif.seek(f)
            read.append(np.asarray(gif.convert("L")))
    assert np.array_equal(np.stack(read), expected[1, 0].numpy())
    written = save_samples(clips, tmp_path / "s", [3, 4], None, per_label=1, grid_max=10)
    batch = np.load(tmp_path / "s.npz")
    assert batch["arr_0"].shape == (2, 3, 4, 5, 1) and np.array_equal(batch["arr_0"], expected.movedim(1, -1).numpy())
    assert (
        batch["arr_1"].tolist() == [3, 4]
        and (tmp_path / "s_gifs" / "00001.gif").is_file()
        and any("GIFs" in w for w in written)
    )
    with Image.open(tmp_path / "s.png") as grid:  # a strip of 3 frames per row, 2 rows
        assert grid.size[0] > 3 * 5 and grid.size[1] < 2 * 3 * 4


def test_frame_strips_lay_frames_left_to_right():
    clips = torch.randn(2, 3, 4, 5, 6)
    strips = frame_strips(clips)
    assert strips.shape == (2, 3, 5, 4 * 6 + 3 * STRIP_GAP)
    assert torch.equal(strips[..., 2 * (6 + STRIP_GAP) : 2 * (6 + STRIP_GAP) + 6], clips[:, :, 2])
    assert torch.equal(strips[..., 6 : 6 + STRIP_GAP], torch.ones(2, 3, 5, STRIP_GAP))


def write_clip_folder(root, frames=4, size=8):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        np.save(root / label / "c0.npy", rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
        folder = root / label / "c1"
        folder.mkdir()
        for f in range(frames):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{f:03d}.png")
    return root


def test_clip_folder_reads_npy_and_frame_folders(tmp_path):
    root = write_clip_folder(tmp_path / "clips")
    data = ClipFolder(root, 8)
    assert len(data) == 4 and data.num_classes == 2 and data.resolution == (4, 8, 8) and data.channels == 3
    x, y = data.load(torch.arange(4))
    assert x.shape == (4, 3, 4, 8, 8) and y.tolist() == [0, 0, 1, 1]
    raw = np.load(root / "a" / "c0.npy")
    torch.testing.assert_close(x[0], torch.from_numpy(raw).permute(3, 0, 1, 2).float() / 127.5 - 1)
    frame = np.array(Image.open(root / "b" / "c1" / "002.png"))
    torch.testing.assert_close(x[3, :, 2], torch.from_numpy(frame).permute(2, 0, 1).float() / 127.5 - 1)


def test_captioned_clips_are_found_at_any_depth_and_the_uncaptioned_skipped(tmp_path, capsys):
    """`prepare --clips --captions`: .npy clips and frame folders under the root, keyed by their relative paths; the
    frames inside a frame folder are not clips; none captioned is one line."""
    from sprintdit.captions import captioned_files

    root = write_clip_folder(tmp_path / "clips")
    found = ClipFolder.clips_under(root)
    assert found == ["a/c0.npy", "a/c1", "b/c0.npy", "b/c1"]
    kept = captioned_files(root, {"a/c1": "a bag", "b/c0.npy": "", "x.npy": "gone"}, found, "clip")
    assert kept == ["a/c1", "b/c0.npy"]
    err = capsys.readouterr().err
    assert "2 of 4 clips under" in err and "1 captioned files are not clips" in err
    data = ClipFolder(root, 8, clips=[(root / f, row) for row, f in enumerate(kept, 1)])
    assert data.classes == [] and data.load(torch.arange(2))[1].tolist() == [1, 2]  # caption-table rows
    with pytest.raises(UserError, match="no clip under .* has a caption"):
        captioned_files(root, {"elsewhere.npy": "a"}, found, "clip")


@pytest.mark.parametrize(
    "fault,message",
    [
        ("length", r"clip .*c0.npy is 3x8x8x3 .*every clip must be 4x8x8x3"),
        ("size", r"clip .*c1 is 4x8x6x3"),
        ("frames", r"data.frames"),
    ],
)
def test_clip_folder_rejects_clips_of_the_wrong_length_or_size(tmp_path, fault, message):
    root = write_clip_folder(tmp_path / "clips")
    if fault == "length":
        np.save(root / "b" / "c0.npy", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    elif fault == "size":
        Image.fromarray(np.zeros((8, 6, 3), dtype=np.uint8)).save(root / "a" / "c1" / "000.png")
    with pytest.raises(UserError, match=message):
        ClipFolder(root, 8, frames=5 if fault == "frames" else None)


def test_stage_rates_skip_each_stage_start():
    rows = [
        {"steps_per_s": 9.0, "stage": "short"},
        {"steps_per_s": 8.0, "stage": "short"},
        {"steps_per_s": 1.0, "stage": "pre"},
        {"steps_per_s": 4.0, "stage": "pre"},
        {"steps_per_s": 5.0, "stage": "pre"},
        {"steps_per_s": 0.5, "stage": "ft"},
        {"steps_per_s": 2.0, "stage": "ft"},
        {"fid": 3.0},
    ]
    assert stage_rates(rows) == {"short": 8.0, "pre": 5.0, "ft": 2.0}


def video_run(root, *extra):
    return load_config(
        None,
        [
            "data.name=clip_folder",
            f"data.root={root}",
            "data.resolution=8",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "model.patch_size_t=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.ckpt_every=100",
            "train.sample_every=2",
            "train.grid_rows=2",
            "train.grid_columns=1",
            "train.ema_decay=0.9",
            "stages=[{name: pre, steps: 3, lr: 0.001, mask_ratio: 0.5}, {name: ft, steps: 2, lr: 0.0005, mask_ratio: "
            "0.0}]",
            *extra,
        ],
    )


def test_video_run_trains_both_stages_and_resumes_exactly(tmp_path):
    root = write_clip_folder(tmp_path / "clips")
    straight = Trainer(video_run(root), tmp_path / "a", progress=False)
    assert straight.cfg.model.input_size == [4, 8, 8] and straight.cfg.model.grid == (2, 2, 2)
    straight.fit()
    first = Trainer(video_run(root), tmp_path / "b", progress=False)
    first.fit(stop_at=2)
    resumed = Trainer(video_run(root), tmp_path / "b", progress=False)
    assert resumed.step == 2
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())  # frame-strip grids were written


def test_a_shorter_clip_stage_trains_on_the_first_frames_and_resumes_exactly(tmp_path):
    root = write_clip_folder(tmp_path / "clips")
    short = ["stages.0.frames=2"]  # stage 0: a 1x2x2 token grid (mask 0.5 keeps 2 of each 1x2x2 group), stage 1: 2x2x2
    straight = Trainer(video_run(root, *short), tmp_path / "a", progress=False)
    seen = []
    straight.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    straight.fit()
    assert seen == [(4, 3, 2, 8, 8)] * 3 + [(4, 3, 4, 8, 8)] * 2  # (B, C, F, H, W), RGB clips
    flops = [r["train_flops"] for r in straight.folder.metrics() if "loss" in r]
    per_step = [b - a for a, b in zip([0, *flops], flops)]
    model = straight.cfg.model
    assert per_step == [3 * forward_flops(model.at_frames(2), 4, 0.5)] * 3 + [3 * forward_flops(model, 4)] * 2
    first = Trainer(video_run(root, *short), tmp_path / "b", progress=False)
    first.fit(stop_at=2)
    resumed = Trainer(video_run(root, *short), tmp_path / "b", progress=False)
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_video_config_errors(tmp_path):
    root = write_clip_folder(tmp_path / "clips")
    with pytest.raises(UserError, match="eval.every scores images"):
        video_run(root, "eval.every=2")
    with pytest.raises(UserError, match="data.frames is for video data"):
        load_config(None, ["data.frames=4"])
    with pytest.raises(UserError, match=r"not achievable on a 2x2x2 token grid"):
        Trainer(video_run(root, "stages.0.mask_ratio=0.3"), tmp_path / "c", progress=False)
    for frames in (3, 6):  # not a whole token frame; longer than the clips
        with pytest.raises(UserError, match=rf"stages.0 \(pre\): frames {frames} trains a SiT video model"):
            Trainer(video_run(root, f"stages.0.frames={frames}"), tmp_path / "c", progress=False)
    with pytest.raises(UserError, match=r"not achievable on a 1x2x2 token grid"):  # the stage's grid is checked
        Trainer(video_run(root, "stages.0.frames=2", "stages.0.mask_ratio=0.875"), tmp_path / "c", progress=False)


def test_video_demo_end_to_end(fmnist_dir, tmp_path):
    import json

    from sprintdit.demo import run_video_demo

    cfg = load_config(
        "fashion_mnist_video",
        [
            f"data.root={fmnist_dir}",
            "data.frames=4",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "train.batch_size=4",
            "train.log_every=1",
            *(f"stages.{i}.steps=2" for i in range(4)),
            "stages.0.warmup_steps=1",
            "stages.3.warmup_steps=1",
            "eval.num_samples=20",
            "sample.steps=2",
            "sample.batch_size=20",
        ],
    )
    lines = []
    results = run_video_demo(cfg, tmp_path / "demo", shown=1, progress=False, log=lines.append)
    assert json.loads((tmp_path / "demo" / "demo.json").read_text()) == results
    # real clips: one garment, bouncing
    assert results["real"]["path_residual_px"] < 1e-4 and results["real"]["clip_consistency"] == 1.0
    for guidance in ("pdg", "cfg"):
        r = results[guidance]
        assert 0 <= r["frame_class_agreement"] <= 1 and np.load(r["npz"])["arr_0"].shape == (20, 4, 32, 32, 1)
        assert len(list((tmp_path / "demo" / f"demo_{guidance}_gifs").glob("*.gif"))) == 10
    assert results["stage1_speedup"] > 0 and any("stage pretrain (mask 0.75) runs" in line for line in lines)
