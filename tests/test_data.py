import numpy as np
import pytest
import torch
from conftest import write_idx

from sprintdit.data import ImageFolder, batches, index_batches
from sprintdit.fashion_mnist import FashionMNIST, read_idx
from sprintdit.errors import UserError


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip(tmp_path, compress):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    name = "x.gz" if compress else "x"
    write_idx(tmp_path / name, arr, 0x0803, compress)
    assert np.array_equal(read_idx(tmp_path / name, 0x0803), arr)
    with pytest.raises(UserError, match="magic"):
        read_idx(tmp_path / name, 0x0801)


def test_truncated_idx_is_an_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 28, 28)), 0x0803, compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "x", 0x0803)


def test_fashion_mnist_padding_and_range(fmnist_dir):
    ds = FashionMNIST(fmnist_dir, "train", 32)
    raw = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz", 0x0803)
    x, y = ds.load(torch.tensor([3, 0]))
    assert x.shape == (2, 1, 32, 32) and len(ds) == 40 and ds.num_classes == 10
    assert torch.equal(y, torch.tensor([3, 0]))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0, 0, 2:30, 2:30], torch.from_numpy(raw[3].copy()).float() / 127.5 - 1)
    assert bool((x[:, :, :2] == -1).all())  # zero padding is black
    assert len(FashionMNIST(fmnist_dir, "test", 28)) == 20


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path)


def test_batch_stream_is_epoch_permutations_and_resumable():
    stream = index_batches(10, 4, seed=3, position=0)
    first = torch.cat([next(stream) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])
    resumed = index_batches(10, 4, seed=3, position=8)
    assert torch.equal(torch.cat([next(resumed), next(resumed), next(resumed)]), first[8:20])
    assert not torch.equal(next(index_batches(10, 4, seed=4, position=0)), first[:4])


def test_image_folder_and_workers(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * label + i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.num_classes == 2
    x, y = ds.load(torch.tensor([4]))
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [1]
    assert torch.allclose(x, torch.full_like(x, (40 + 1) / 127.5 - 1), atol=1e-6)
    plain = [next(batches(ds, 4, 0, 2, num_workers=0)) for _ in range(1)][0]
    loaded = next(batches(ds, 4, 0, 2, num_workers=1))
    assert torch.equal(plain[0], loaded[0]) and torch.equal(plain[1], loaded[1])


def test_empty_image_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolder(tmp_path, 16)


def test_image_folder_crops_as_prepare_does(tmp_path):
    """One crop for training from images and for `prepare`: ADM's (box halving, bicubic, centre)."""
    from PIL import Image

    from sprintdit.data import ImageFolder
    from sprintdit.images import read_image

    (tmp_path / "c").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c" / "a.png")
    x, _ = ImageFolder(tmp_path, 64).load(torch.tensor([0]))
    assert torch.equal(((x[0] + 1) * 127.5).round().to(torch.uint8), read_image(tmp_path / "c" / "a.png", 64))
