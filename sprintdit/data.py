"""Datasets behind one interface, and the deterministic, resumable batch order the trainer draws from.

A dataset has `num_classes`, `channels`, `resolution` (H, W), `len()` and `load(indices) -> (x, y)` with
x float in [-1, 1] of shape (B, C, H, W) and y int64 labels. The order of samples is a fresh permutation
per epoch, seeded by (seed, epoch), so a position (samples consumed) is all that resume needs. Under
torchrun every rank walks the same global order and loads only its rows of each global batch, so the
position counts global samples and does not depend on the world size.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError

IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801
FASHION_MNIST_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_HINT = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist, as root) "
    "or point data.root at a folder holding train-images-idx3-ubyte.gz and its three sibling files"
)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (raw or .gz) as a uint8 array of the shape its header states."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        raise UserError(f"{path} is not an IDX file of the expected kind (magic number mismatch)")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {FASHION_MNIST_HINT}")


class FashionMNIST:
    """Fashion-MNIST from the standard IDX files, zero-padded from 28x28 to `resolution`, 1 channel."""

    num_classes = len(FASHION_MNIST_CLASSES)
    channels = 1

    def __init__(self, root: str | Path, split: str = "train", resolution: int = 32):
        root = Path(root)
        if split not in FASHION_MNIST_FILES:
            raise UserError(f"data.split for fashion_mnist is {split!r}; choose train or test")
        if not root.is_dir():
            raise UserError(f"Fashion-MNIST folder {root} does not exist: {FASHION_MNIST_HINT}")
        stem = FASHION_MNIST_FILES[split]
        images = read_idx(_find(root, stem.format("images", 3)), IDX_IMAGES)  # (N, 28, 28)
        labels = read_idx(_find(root, stem.format("labels", 1)), IDX_LABELS)  # (N,)
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
        size = images.shape[1]
        if resolution < size:
            raise UserError(f"data.resolution {resolution} is below Fashion-MNIST's {size}x{size}")
        before = (resolution - size) // 2
        pad = ((0, 0), (before, resolution - size - before), (before, resolution - size - before))
        self.images = torch.from_numpy(np.pad(images, pad)).unsqueeze(1)  # (N, 1, R, R) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.resolution = (resolution, resolution)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices].float() / 127.5 - 1.0, self.labels[indices]


class ImageFolder:
    """Class-per-folder images (root/CLASS/*.png ...), labels by sorted folder name; RGB, resized
    so the short side is `resolution`, then centre-cropped to a square."""

    channels = 3

    def __init__(self, root: str | Path, resolution: int):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.files:
            raise UserError(f"no images found under {root} (expected one sub-folder of images per class)")
        self.num_classes = len(self.classes)
        self.resolution = (resolution, resolution)

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            r = self.resolution[0]
            scale = r / min(img.size)
            img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - r) // 2, (img.height - r) // 2
            arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, R, R)

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self._image(self.files[i][0]) for i in indices.tolist()])
        labels = torch.tensor([self.files[i][1] for i in indices.tolist()], dtype=torch.int64)
        return images.float() / 127.5 - 1.0, labels


def build_dataset(cfg) -> FashionMNIST | ImageFolder:
    """The dataset a DataConfig names."""
    if cfg.name == "fashion_mnist":
        return FashionMNIST(cfg.root, cfg.split, cfg.resolution)
    return ImageFolder(cfg.root, cfg.resolution)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)) & (2**63 - 1)))


def index_batches(n: int, batch: int, seed: int, position: int) -> Iterator[torch.Tensor]:
    """Endless batches of sample indices starting `position` samples into the stream; batches may span epochs."""
    epoch, offset = divmod(position, n)
    perm = epoch_permutation(n, seed, epoch)
    while True:
        parts, need = [], batch
        while need:
            take = perm[offset : offset + need]
            parts.append(take)
            need -= len(take)
            offset += len(take)
            if offset == n:
                epoch, offset = epoch + 1, 0
                perm = epoch_permutation(n, seed, epoch)
        yield torch.cat(parts)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices: torch.Tensor):
        return self.dataset.load(indices)


def batches(
    dataset, batch: int, seed: int, position: int, num_workers: int = 0, rows: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches in the stream order (only `rows` of each global batch, if given: one rank's share);
    with workers, batches are loaded ahead in other processes."""
    order = index_batches(len(dataset), batch, seed, position)
    if rows is not None:
        order = (ids[rows] for ids in order)
    if num_workers == 0:
        return (dataset.load(ids) for ids in order)
    loader = torch.utils.data.DataLoader(_BatchDataset(dataset), sampler=order, batch_size=None, num_workers=num_workers)
    return iter(loader)
