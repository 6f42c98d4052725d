"""Moving Fashion-MNIST: short clips of one shrunk garment moving at constant velocity, bouncing off the edges,
generated from the IDX files; and the scores of generated clips.

Clip i (F frames of 32x32, 1 channel; F = data.frames, default 8) shows one Fashion-MNIST garment shrunk from
28x28 to 16x16. Its top-left corner starts at an integer position in [0, 16]^2 and moves by an integer velocity
in [-MAX_SPEED, MAX_SPEED]^2 (not both 0) per frame, reflected at the canvas edges. The garment, start and
velocity come from a generator seeded with (seed, i), so the data set is the same on every machine. The label is
the garment's class.

Scores (`score_clips`), read frame by frame (`Readers`): per-frame class agreement, clip
consistency (the share of clips whose frames are all read as one class), the garment's centroid path against the
best constant-velocity-with-bounces path (mean residual in pixels; 0 for real clips), and a Frechet distance of the
classifier's features of every frame against real clips' frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .fashion_mnist import FashionMNIST
from .errors import UserError
from .layouts import CANVAS, CELL, GARMENT, shrink

FRAMES = 8  # default clip length
TRAVEL = CANVAS - CELL  # the top-left corner moves in [0, TRAVEL] along each axis
MAX_SPEED = 2  # pixels per frame along each axis (2-frame tokens: a token's frames differ by at most half a patch)
INK = 0.1  # pixels (in [0, 1]) below this are background when locating the garment
SPLITS = {"train": "train", "test": "test"}  # clip split -> the Fashion-MNIST split its garments come from
START_STEP, SPEED_STEP = 0.25, 0.125  # the path fit's search grid: start (pixels) and velocity (pixels per frame)


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, travel: float = TRAVEL) -> np.ndarray:
    """Positions (..., frames) of start + velocity * f reflected into [0, travel] (a triangle wave of period 2
    travel)."""
    u = np.mod(start[..., None] + velocity[..., None] * np.arange(frames), 2 * travel)
    return travel - np.abs(travel - u)


class MovingFashionMNIST:
    """`data.name: moving_fashion_mnist`: clips (B, 1, F, 32, 32) in [-1, 1] and labels; split train or test picks
    the Fashion-MNIST images the garments come from."""

    channels = 1
    num_classes = FashionMNIST.num_classes

    def __init__(self, root: str, split: str = "train", frames: int | None = None, size: int = 60000, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"data.split for moving_fashion_mnist is {split!r}; choose {' or '.join(SPLITS)}")
        frames = FRAMES if frames is None else frames
        if frames < 1:
            raise UserError(f"data.frames must be >= 1, got {frames}")
        source = FashionMNIST(root, SPLITS[split], GARMENT)
        self.garments = shrink(source.images[:, 0])  # (M, 16, 16) in [0, 1]
        self.labels = source.labels
        self.frames, self.size, self.seed = frames, size, seed
        self.resolution = (frames, CANVAS, CANVAS)

    def __len__(self) -> int:
        return self.size

    def item(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Clip i's garment (an index into the split's images), start (2,) and velocity (2,) as (row, column)."""
        rng = np.random.default_rng((self.seed, i))
        garment = int(rng.integers(len(self.garments)))
        start = rng.integers(0, TRAVEL + 1, size=2)
        velocity = np.zeros(2, dtype=np.int64)
        while not velocity.any():
            velocity = rng.integers(-MAX_SPEED, MAX_SPEED + 1, size=2)
        return garment, start, velocity

    def corners(self, i: int) -> np.ndarray:
        """(frames, 2) integer top-left corners (row, column) of clip i's garment."""
        _, start, velocity = self.item(i)
        return bounce(start.astype(np.float64), velocity.astype(np.float64), self.frames).T.round().astype(np.int64)

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, F, 32, 32) in [-1, 1] and labels (B,)."""
        clips, labels = torch.zeros(len(indices), 1, self.frames, CANVAS, CANVAS), []
        for b, i in enumerate(indices.tolist()):
            garment, _, _ = self.item(i)
            for f, (r, c) in enumerate(self.corners(i)):
                clips[b, 0, f, r : r + CELL, c : c + CELL] = self.garments[garment]
            labels.append(int(self.labels[garment]))
        return clips * 2 - 1, torch.tensor(labels)


def garment_windows(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (N, 32, 32) in [-1, 1] -> the 16x16 window around each frame's garment (N, 16, 16) and the ink
    centroid (N, 2) as (row, column) in pixels. The window centres the bounding box of the ink (clamped to the
    canvas); a frame without ink gets the centre window and the canvas centre."""
    ink = ((frames + 1) / 2 - INK).clamp(min=0)  # (N, 32, 32)
    axis = torch.arange(CANVAS, dtype=ink.dtype)
    mass = ink.sum((1, 2)).clamp(min=1e-8)
    centroid = torch.stack([(ink.sum(2) * axis).sum(1) / mass, (ink.sum(1) * axis).sum(1) / mass], dim=1)  # (N, 2)
    windows = []
    for frame, weights in zip(frames, ink):
        corner = []
        for profile in (weights.sum(1), weights.sum(0)):  # rows, columns
            inked = profile.nonzero()[:, 0]
            middle = (inked[0] + inked[-1]).item() / 2 if len(inked) else (CANVAS - 1) / 2
            corner.append(int(min(max(round(middle - (CELL - 1) / 2), 0), TRAVEL)))
        windows.append(frame[corner[0] : corner[0] + CELL, corner[1] : corner[1] + CELL])
    return torch.stack(windows), centroid


def path_residual(centroids: np.ndarray) -> np.ndarray:
    """centroids (N, F, 2) -> (N,) mean absolute distance (pixels) of each clip's centroid path from the best
    constant-velocity path with bounces (offset + bounce(start, velocity) per axis, searched on a fine grid)."""
    n, frames, _ = centroids.shape
    starts = np.arange(0, 2 * TRAVEL, START_STEP)
    speeds = np.arange(-MAX_SPEED - 1, MAX_SPEED + 1 + SPEED_STEP / 2, SPEED_STEP)
    s, v = np.meshgrid(starts, speeds, indexing="ij")
    paths = bounce(s.ravel(), v.ravel(), frames)  # (P, F)
    paths = paths - paths.mean(1, keepdims=True)  # the offset is free: compare centred paths
    residual = np.empty((n, 2))
    for axis in range(2):
        track = centroids[:, :, axis] - centroids[:, :, axis].mean(1, keepdims=True)  # (N, F)
        error = np.abs(track[:, None, :] - paths[None]).mean(2)  # (N, P)
        residual[:, axis] = error.min(1)
    return residual.mean(1)


@dataclass
class Readers:
    """What reads clips: `garments` classifies each frame's shrunk garment (the classifier trained on garments shrunk
    to 16x16 and grown back; the full-size one reads real shrunk garments at 77%), `frames` gives the features of
    whole frames for the Frechet distance (the shipped classifier)."""

    garments: torch.nn.Module
    frames: torch.nn.Module


def load_readers(device: torch.device | str = "cpu") -> Readers:
    from .metrics.fmnist_classifier import GARMENT_WEIGHTS, WEIGHTS, load_classifier

    return Readers(load_classifier(GARMENT_WEIGHTS, device), load_classifier(WEIGHTS, device))


def frame_classes(clips: torch.Tensor, readers: Readers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clips (N, 1, F, 32, 32) in [-1, 1] -> each frame's class (N, F), centroids (N, F, 2) and the features of
    every whole frame (N * F, FEATURE_DIM)."""
    from .metrics.fmnist_classifier import classify, classify_garments

    n, _, frames = clips.shape[:3]
    flat = clips.clamp(-1, 1)[:, 0].reshape(n * frames, CANVAS, CANVAS)
    windows, centroids = garment_windows(flat)
    classes = classify_garments(readers.garments, windows).argmax(1).view(n, frames)
    features = classify(readers.frames, flat[:, None])[0]
    return classes, centroids.view(n, frames, 2), features


def score_clips(clips: torch.Tensor, labels: torch.Tensor, readers: Readers, real_stats) -> dict:
    """The moving-garment scores of generated clips (N, 1, F, 32, 32) against their labels (N,) and the feature
    statistics (mean, covariance) of real clips' frames."""
    from .metrics.frechet import feature_stats, frechet_distance

    check_clip_shape(clips)
    classes, centroids, features = frame_classes(clips, readers)
    return {
        "frame_class_agreement": (classes == labels[:, None]).float().mean().item(),
        "clip_consistency": (classes == classes[:, :1]).all(1).float().mean().item(),
        "path_residual_px": float(path_residual(centroids.double().numpy()).mean()),
        "frame_fid": frechet_distance(*feature_stats(features), *real_stats),
    }


def real_frame_stats(clips: torch.Tensor, readers: Readers):
    """Feature statistics of real clips' frames, the reference of `score_clips`."""
    from .metrics.frechet import feature_stats

    return feature_stats(frame_classes(clips, readers)[2])


def check_clip_shape(x: torch.Tensor) -> None:
    if x.ndim != 5 or tuple(x.shape[1:2]) + tuple(x.shape[3:]) != (1, CANVAS, CANVAS):
        raise UserError(f"moving Fashion-MNIST scores take clips (N, 1, F, {CANVAS}, {CANVAS}), got {tuple(x.shape)}")
