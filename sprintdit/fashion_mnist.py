"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist installs them under
/usr/share/datasets/fashion-mnist): the embedded data set every demo builds on."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801
FASHION_MNIST_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_HINT = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist, as root) "
    "or point data.root at a folder holding train-images-idx3-ubyte.gz and its three sibling files"
)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (raw or .gz) as a uint8 array of the shape its header states."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # truncated or not gzip at all
        raise UserError(
            f"{path} is unreadable or a damaged gzip file ({err}); restore it (e.g. reinstall dataset-fashion-mnist)"
        ) from None
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
        if labels.size and int(labels.max()) >= self.num_classes:
            raise UserError(
                f"Fashion-MNIST {split} labels must be in [0, {self.num_classes - 1}], found {int(labels.max())}: the "
                f"label file is damaged"
            )
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
