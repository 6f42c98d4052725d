"""A small CNN for 1x32x32 Fashion-MNIST in the library's [-1, 1] pixel range: its penultimate features
feed FID-style and precision/recall metrics, its logits the Inception-Score-style score and class agreement.

The trained weights ship beside this file (`weights/fmnist_classifier.safetensors`) with a JSON record of
their sha256 and test accuracy, both written by `scripts/train_fmnist_classifier.py`; the loader refuses a
file whose checksum differs from the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import sha256_file

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"
# The same network trained on garments shrunk to 16x16 and grown back (`regrown`): the reader of shrunk garments in
# moving clips, which the full-size classifier reads at 77% (scripts/train_fmnist_classifier.py --garment-side 16)
GARMENT_WEIGHTS = Path(__file__).parent / "weights" / "fmnist_garment16.safetensors"
INPUT_SHAPE = (1, 32, 32)  # (C, H, W)
GARMENT_SIDE = 28  # Fashion-MNIST's images, zero-padded to INPUT_SHAPE in training
NUM_CLASSES = 10
STAGES = ((24, 1), (48, 1), (96, 2))  # (channels, 3x3 conv layers) per stage; each stage ends in a 2x2 max-pool
FEATURE_DIM = 256
CLASSIFY_BATCH = 500  # images per forward in `classify`
RETRAIN_HINT = "run scripts/train_fmnist_classifier.py to rebuild both"


def record_path(weights: Path) -> Path:
    """The JSON record (sha256, test accuracy, how it was trained) that sits beside a weights file."""
    return weights.with_suffix(".json")


class FMNISTClassifier(nn.Module):
    """Conv-BN-ReLU stages, each ending in a max-pool (32x32 -> 4x4), a linear layer with ReLU to
    FEATURE_DIM features, and a linear classifier on them."""

    def __init__(self):
        super().__init__()
        layers, channels = [], INPUT_SHAPE[0]
        for width, convs in STAGES:
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        side = INPUT_SHAPE[1] >> len(STAGES)
        self.conv = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, 32, 32) in [-1, 1] -> features (B, FEATURE_DIM), logits (B, NUM_CLASSES)."""
        features = self.embed(self.conv(x))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def read_record(weights: Path = WEIGHTS) -> dict:
    path = record_path(weights)
    if not path.is_file():
        raise UserError(f"classifier record {path} is missing: {RETRAIN_HINT}")
    return json.loads(path.read_text())


def load_classifier(weights: str | Path = WEIGHTS, device: torch.device | str = "cpu") -> FMNISTClassifier:
    """The trained classifier in eval mode, after checking the weights against the sha256 in their record."""
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"classifier weights {weights} are missing: {RETRAIN_HINT}")
    expected, found = read_record(weights)["sha256"], sha256_file(weights)
    if found != expected:
        raise UserError(
            f"classifier weights {weights} have sha256 {found}, but {record_path(weights).name} records {expected}: "
            f"{RETRAIN_HINT}"
        )
    model = FMNISTClassifier()
    model.load_state_dict(load_file(weights))
    return model.to(device).eval()


@torch.no_grad()
def classify(
    model: FMNISTClassifier, images: torch.Tensor, batch_size: int = CLASSIFY_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 1, 32, 32) in [-1, 1] -> features (N, FEATURE_DIM), logits (N, NUM_CLASSES), on the CPU, float32."""
    if images.ndim != 4 or tuple(images.shape[1:]) != INPUT_SHAPE:
        raise UserError(
            f"the Fashion-MNIST classifier takes images (N, {', '.join(map(str, INPUT_SHAPE))}), got "
            f"{tuple(images.shape)}"
        )
    device = next(model.parameters()).device
    features, logits = [], []
    for block in images.split(batch_size):
        f, l = model.features_and_logits(block.to(device, torch.float32))
        features.append(f.cpu())
        logits.append(l.cpu())
    return torch.cat(features), torch.cat(logits)


def regrown(crops: torch.Tensor) -> torch.Tensor:
    """Shrunk garments (N, S, S) in [-1, 1] -> (N, 1, 32, 32): scaled back to 28x28 and padded to 32, as the classifier
    was trained."""
    pad = (INPUT_SHAPE[1] - GARMENT_SIDE) // 2
    grown = F.interpolate(
        crops[:, None].float(), size=(GARMENT_SIDE, GARMENT_SIDE), mode="bilinear", align_corners=False
    )
    return F.pad(grown, (pad, pad, pad, pad), value=-1.0).clamp(-1, 1)


def classify_garments(model: FMNISTClassifier, crops: torch.Tensor) -> torch.Tensor:
    """Shrunk garments (N, S, S) in [-1, 1] (crops of a layout cell or a moving clip's frame) -> logits (N,
    NUM_CLASSES)."""
    return classify(model, regrown(crops))[1]
