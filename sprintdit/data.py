"""Datasets behind one interface, and the deterministic, resumable batch order the trainer draws from.

A dataset has `num_classes`, `channels`, `resolution` (H, W), `len()` and `load(indices) -> (x, y)` with
x float in [-1, 1] of shape (B, C, H, W) and y int64 labels. The latent dataset returns a `Batch` (a tuple
that also carries the posterior std and optional REPA features): the trainer draws the posterior sample
x + std * noise from the step's draws (sprintdit.draws). The order of samples is a fresh permutation
per epoch, seeded by (seed, epoch), so a position (samples consumed) is all that resume needs. Under
torchrun every rank walks the same global order and loads only its rows of each global batch, so the
position counts global samples and does not depend on the world size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from .captions import CaptionTable, LearnedCaptions, captioned_files, images_under, read_captions_jsonl
from .draws import Draws
from .errors import UserError
from .fashion_mnist import FashionMNIST
from .images import IMAGE_ERRORS, IMAGE_SUFFIXES, read_image, scan_class_folders
from .latents_format import open_shards, read_manifest
from .layouts import CANVAS, FashionMNISTLayouts
from .moving import MovingFashionMNIST


class Batch(NamedTuple):
    x: torch.Tensor  # (B, C, H, W): the data, or for latents the scaled posterior mean
    y: torch.Tensor  # (B,) int64 labels, or captions: (B, L) token ids or (B, L, E) embeddings
    std: Optional[torch.Tensor] = None  # (B, C, H, W) scaled posterior std: training uses x + std * noise
    features: Optional[torch.Tensor] = None  # (B, T, D) REPA targets (DINOv2 patch tokens)
    rows: Optional[torch.Tensor] = None  # (B,) under torchrun: which rows of the global batch these are (None: all)

    def to(self, device: torch.device) -> "Batch":
        """Every tensor on `device` (copies from pinned host memory overlap with compute)."""
        return Batch(*(None if v is None else v.to(device, non_blocking=True) for v in self))


class ClipFolder:
    """`data.name: clip_folder`: one sub-folder per class holding clips, each an `.npy` array (F, H, W, C) uint8 or a
    folder of numbered frames (images sorted by name). Every clip must have `frames` frames (default: the first
    clip's) of resolution x resolution pixels and the same channels (1 or 3); all are checked when the data set
    opens. `clips` given (captioned clips, `prepare --clips --captions`): those (path, label) pairs, no classes."""

    def __init__(
        self, root: str | Path, resolution: int, frames: int | None = None, clips: list[tuple[Path, int]] | None = None
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"clip folder {self.root} does not exist")
        self.classes = [] if clips is not None else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.clips = clips or [
            (p, label)
            for label, name in enumerate(self.classes)
            for p in sorted((self.root / name).iterdir())
            if p.suffix == ".npy" or p.is_dir()
        ]
        if not self.clips:
            raise UserError(
                f"no clips found under {self.root} (expected one sub-folder per class of .npy clips or frame folders)"
            )
        shapes = {path: self.shape_of(path) for path, _ in self.clips}  # (F, H, W, C)
        frames = frames or shapes[self.clips[0][0]][0]
        channels = shapes[self.clips[0][0]][3]
        for path, shape in shapes.items():
            if shape != (frames, resolution, resolution, channels) or channels not in (1, 3):
                raise UserError(
                    f"clip {path} is {'x'.join(map(str, shape))} (F, H, W, C); every clip must be "
                    f"{frames}x{resolution}x{resolution}x{channels} "
                    f"(data.frames, data.resolution; 1 or 3 channels)"
                )
        self.num_classes, self.channels = len(self.classes), channels
        self.resolution = (frames, resolution, resolution)

    @staticmethod
    def frame_files(path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    @classmethod
    def clips_under(cls, root: Path) -> list[str]:
        """Every clip at any depth under `root` (paths relative to it, sorted): `.npy` arrays and folders of frames."""
        found = [p for p in root.rglob("*") if p.suffix == ".npy" or (p.is_dir() and cls.frame_files(p))]
        return sorted(p.relative_to(root).as_posix() for p in found)

    def shape_of(self, path: Path) -> tuple[int, ...]:
        try:
            if path.suffix == ".npy":
                array = np.load(path, mmap_mode="r")
                return tuple(array.shape) if array.ndim == 4 and array.dtype == np.uint8 else (-1,) * 4
            frames = self.frame_files(path)
            if not frames:
                return (0, 0, 0, 0)
            with Image.open(frames[0]) as first:
                w, h = first.size
                c = 1 if first.mode in ("L", "1", "I;16") else 3
            return (len(frames), h, w, c)
        except IMAGE_ERRORS as err:
            raise UserError(f"clip {path} is unreadable ({type(err).__name__}: {err})") from None

    def __len__(self) -> int:
        return len(self.clips)

    def read(self, path: Path) -> np.ndarray:
        """(F, H, W, C) uint8."""
        if path.suffix == ".npy":
            return np.load(path)
        mode = "L" if self.channels == 1 else "RGB"
        frames = [np.asarray(Image.open(p).convert(mode), dtype=np.uint8) for p in self.frame_files(path)]
        array = np.stack(frames)
        if array.shape[1:3] != self.resolution[1:]:
            raise UserError(
                f"clip {path} has frames of {array.shape[2]}x{array.shape[1]} pixels; data.resolution is "
                f"{self.resolution[1]}"
            )
        return array.reshape(*array.shape[:3], self.channels)

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, F, R, R) in [-1, 1] and labels (B,)."""
        clips = [torch.from_numpy(self.read(self.clips[i][0])) for i in indices.tolist()]
        x = torch.stack(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        return x, torch.tensor([self.clips[i][1] for i in indices.tolist()])


class ImageFolder:
    """Class-per-folder images (root/CLASS/*.png ...), labels by sorted folder name; RGB, ADM-cropped to
    `resolution` (the crop `sprintdit prepare` uses). With `captions` (data.captions: a captions.jsonl, or the
    folder `prepare --captions` wrote), any images under root with a caption, and y is the caption (token ids
    (B, L) or embeddings (B, L, E)); see sprintdit.captions for missing, empty and long captions."""

    channels = 3

    def __init__(self, root: str | Path, resolution: int, captions: str | None = None):
        self.root = Path(root)
        self.unreadable: set[Path] = set()
        self.resolution = (resolution, resolution)
        self.caption_table = self.learned_captions = None
        if captions is None:
            self.classes, self.files = scan_class_folders(self.root)
            self.num_classes = len(self.classes)
            return
        self.classes, self.num_classes = [], 0
        if Path(captions).is_dir():  # embeddings prepared for a t5 / clip encoder: label = table row
            self.caption_table = CaptionTable.open(captions)
            row_of = self.caption_table.rows_by_file()
            self.files = [
                (self.root / f, row_of[f]) for f in captioned_files(self.root, row_of, images_under(self.root))
            ]
        else:
            text = read_captions_jsonl(captions)
            names = captioned_files(self.root, text, images_under(self.root))
            self.learned_captions = LearnedCaptions([text[f] for f in names])
            self.files = [(self.root / f, i) for i, f in enumerate(names)]

    @property
    def vocabulary(self) -> list[str] | None:
        return None if self.learned_captions is None else self.learned_captions.vocabulary

    @property
    def max_tokens(self) -> int:
        return (self.learned_captions or self.caption_table).max_tokens

    def __len__(self) -> int:
        return len(self.files)

    def _readable(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, label) of file `index`, or of the next readable file after it: an unreadable one (empty,
        truncated, not an image) is reported once and replaced, the same way on every run, so resume stays exact."""
        for offset in range(len(self.files)):
            path, label = self.files[(index + offset) % len(self.files)]
            if path in self.unreadable:
                continue
            try:
                return read_image(path, self.resolution[0]), label
            except IMAGE_ERRORS as err:
                self.unreadable.add(path)
                print(
                    f"warning: skipping unreadable image {path} ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else 'empty'})",
                    file=sys.stderr,
                )
        raise UserError(f"no readable image under {self.root}")

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, R, R) in [-1, 1] and labels (B,), or captions (B, L) ids or (B, L, E) embeddings."""
        pairs = [self._readable(i) for i in indices.tolist()]
        images = torch.stack([image for image, _ in pairs])
        labels = np.array([label for _, label in pairs], dtype=np.int64)
        captions = self.learned_captions or self.caption_table
        return images.float() / 127.5 - 1.0, torch.from_numpy(labels) if captions is None else captions.rows(labels)


class LatentDataset:
    """Latents written by `sprintdit prepare` (see sprintdit.prepare): every shard's sha256 is checked at open;
    `load` returns a `Batch` of the scaled posterior mean and std (and DINOv2 features if stored)."""

    def __init__(self, root: str | Path, resolution: int):
        root = Path(root)
        manifest = read_manifest(root)
        if manifest["resolution"] != resolution:
            raise UserError(f"data.resolution is {resolution} but {root} was prepared at {manifest['resolution']}")
        self.shards = open_shards(root, manifest)
        self.starts = np.cumsum([0] + [s["count"] for s in manifest["shards"]])  # first global index of each shard
        self.scale = float(manifest["vae"]["scaling_factor"])
        self.vae_path = manifest["vae"]["path"]
        self.classes = list(manifest["classes"])
        self.num_classes = len(self.classes)
        self.caption_table, self.vocabulary = (
            None,
            None,
        )  # prepared with --captions: shards hold `caption` rows of the table
        if manifest.get("captions"):
            self.caption_table = CaptionTable.open(root)
            self.max_tokens = self.caption_table.max_tokens
        self.channels = manifest["latent_shape"][0]
        self.resolution = tuple(manifest["latent_shape"][1:])
        dinov2 = manifest["dinov2"]
        self.feature_shape = None if dinov2 is None else (dinov2["tokens"], dinov2["dim"])  # (T, D) per sample

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _gather(self, key: str, indices: np.ndarray) -> torch.Tensor:
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return torch.from_numpy(np.stack([self.shards[s][key][i - self.starts[s]] for s, i in zip(shard, indices)]))

    def load(self, indices: torch.Tensor) -> Batch:
        ids = indices.numpy()
        features = self._gather("dinov2", ids).float() if self.feature_shape is not None else None
        if self.caption_table is None:
            y = self._gather("labels", ids)  # (B,)
        else:
            y = self.caption_table.rows(self._gather("caption", ids).numpy())  # (B, L, E)
        return Batch(self._gather("mean", ids) * self.scale, y, self._gather("std", ids) * self.scale, features)


def build_dataset(cfg) -> FashionMNIST | ImageFolder | LatentDataset:
    """The dataset a DataConfig names."""
    if cfg.name == "fashion_mnist":
        return FashionMNIST(cfg.root, cfg.split, cfg.resolution)
    if cfg.name == "latents":
        return LatentDataset(cfg.root, cfg.resolution)
    if cfg.name == "fashion_mnist_layouts":
        if cfg.resolution != CANVAS:
            raise UserError(
                f"data.resolution for fashion_mnist_layouts is {CANVAS} (2x2 cells of 16), got {cfg.resolution}"
            )
        return FashionMNISTLayouts(cfg.root, cfg.split)
    if cfg.name == "moving_fashion_mnist":
        if cfg.resolution != CANVAS:
            raise UserError(f"data.resolution for moving_fashion_mnist is {CANVAS}, got {cfg.resolution}")
        return MovingFashionMNIST(cfg.root, cfg.split, cfg.frames)
    if cfg.name == "clip_folder":
        return ClipFolder(cfg.root, cfg.resolution, cfg.frames)
    return ImageFolder(cfg.root, cfg.resolution, cfg.captions)


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
    dataset,
    batch: int,
    seed: int,
    position: int,
    num_workers: int = 0,
    rows: torch.Tensor | None = None,
    pin: bool = False,
) -> Iterator[Batch]:
    """Batches in the stream order (only `rows` of each global batch, if given: one rank's share); with
    workers, batches are loaded ahead in other processes. `pin` (training on CUDA): in page-locked memory, so the
    copy to the device runs asynchronously instead of blocking the host."""
    order = index_batches(len(dataset), batch, seed, position)
    if rows is not None:
        order = (ids[rows] for ids in order)
    if num_workers == 0:
        loaded = (Batch(*dataset.load(ids)) for ids in order)
        loaded = (Batch(*(None if v is None else v.pin_memory() for v in b)) for b in loaded) if pin else loaded
    else:
        loader = torch.utils.data.DataLoader(
            _BatchDataset(dataset), sampler=order, batch_size=None, num_workers=num_workers, pin_memory=pin
        )
        loaded = (Batch(*b) for b in loader)
    return loaded if rows is None else (b._replace(rows=rows) for b in loaded)


def posterior_sample(batch: Batch, draws: Draws) -> torch.Tensor:
    """The training input: x itself, or for latents a fresh posterior sample x + std * noise (noise from `draws`).

    Under torchrun the batch holds one rank's `rows` of the global batch: the noise is drawn for all of it and
    those rows kept, so every sample gets the same noise for any world size."""
    if batch.std is None:
        return batch.x
    shape = batch.x.shape[1:]
    noise = draws.randn(batch.x.shape[0], *shape) if batch.rows is None else draws.randn_at(batch.rows, *shape)
    return batch.x + batch.std * noise
