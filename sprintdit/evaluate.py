"""Score a set of samples against a reference: features from a feature network, then the metrics.

Feature networks (`eval.features`):
    fmnist     the shipped Fashion-MNIST classifier (1x32x32): fid, precision, recall, density, coverage,
               is (its logits' Inception-Score-style score), class_agreement (when labels are known)
    inception  InceptionV3 in the FID form of the ADM / torch-fidelity evaluators, weights from a local file:
               fid (pool3), sfid (7 x 17 x 17 mixed_6 features), is, precision, recall (k = 3)
    dinov2     DINOv2 ViT-L/14 CLS features, weights from a local file: fdd
    auto       fmnist for 1x32x32 images; otherwise inception, plus dinov2 when its weights are given

Sample and reference batches use the ADM npz layout: uint8 images (N, H, W, C) under `arr_0`, labels
under `arr_1` (optional). A reference may instead (or also) hold statistics: `mu`/`sigma` (pool3) and
`mu_s`/`sigma_s` (spatial), as in ADM's reference batches, and `<network>_mu`/`<network>_sigma` for the
other networks; statistics, where present, are used for the Frechet distances and the images for
precision/recall. The Fashion-MNIST test split's features are computed once and cached.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .config import EvalConfig
from .errors import UserError, warn
from .files import atomic_write_npz
from .metrics import class_agreement, feature_stats, frechet_distance, inception_score, prdc
from .metrics.fmnist_classifier import INPUT_SHAPE as FMNIST_SHAPE

ZIP_MAGIC = b"PK"  # an npz file is a zip archive (its first bytes)
HEAD_SHOWN = 8  # bytes of a file that is not an npz quoted in the error
CACHE_ENV = "SPRINTDIT_CACHE"  # where reference features are cached (default ~/.cache/sprintdit)
ADM_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # the inception keys of ADM reference batches


# ----------------------------------------------------------------------------------- npz batches


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(HEAD_SHOWN)
    if not head.startswith(ZIP_MAGIC):
        raise UserError(
            f"{path} is not an npz file (an npz is a zip archive of arrays, as np.savez writes; this file starts with "
            f"{head!r})"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a zip cut short: BadZipFile or EOFError
        raise UserError(f"{path} is not a readable npz file ({str(err).splitlines()[0]})") from None


def batch_images(arrays: dict[str, np.ndarray], source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ADM layout -> images (N, C, H, W) uint8 and labels (N,) or None."""
    if "arr_0" not in arrays:
        raise UserError(
            f"{source} has no arr_0 (the ADM layout keeps the images there); it holds "
            f"{', '.join(sorted(arrays)) or 'nothing'}"
        )
    images = arrays["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{source}: arr_0 must be uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    labels = arrays.get("arr_1")
    if labels is not None and labels.shape != (len(images),):
        raise UserError(
            f"{source}: arr_1 must hold one label per image, got shape {labels.shape} for {len(images)} images"
        )
    if labels is not None and (labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0)):
        raise UserError(
            f"{source}: arr_1 must hold non-negative integer class labels, got {labels.dtype} values such as "
            f"{labels[:3].tolist()}"
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), None if labels is None else torch.from_numpy(
        labels.astype(np.int64)
    )


# ----------------------------------------------------------------------------------- feature networks


@dataclass
class Features:
    """What a feature network gives for a set of images: `main` (N, D) for the Frechet distance and
    precision/recall, optional `spatial` (N, D') for sFID and `logits` (N, classes) for IS / agreement."""

    main: torch.Tensor
    spatial: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class FeatureNet(Protocol):
    """A named feature network: images uint8 (N, C, H, W) -> Features."""

    name: str

    def __call__(self, images: torch.Tensor) -> Features: ...


class FMNISTFeatures(FeatureNet):
    name = "fmnist"

    def __init__(self, device: torch.device, batch_size: int):
        from .metrics import load_classifier

        self.model = load_classifier(device=device)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> Features:
        from .metrics import classify

        features, logits = classify(self.model, images.float() / 127.5 - 1.0, self.batch_size)
        return Features(features, logits=logits)


class InceptionFeatures(FeatureNet):
    name = "inception"

    def __init__(self, weights: str | None, device: torch.device, batch_size: int, resize: str):
        from .metrics.inception import load_inception

        self.model = load_inception(weights, device)
        self.batch_size, self.resize = batch_size, resize

    def __call__(self, images: torch.Tensor) -> Features:
        from .metrics.inception import inception_features

        out = inception_features(self.model, images, self.batch_size, self.resize)
        return Features(out["pool"], spatial=out["spatial"], logits=out["logits"])


class DINOv2Features(FeatureNet):
    name = "dinov2"

    def __init__(self, weights: str | None, preset: str, device: torch.device, batch_size: int):
        from .metrics.dinov2 import load_dinov2

        self.model = load_dinov2(weights, preset, device)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> Features:
        from .metrics.dinov2 import dinov2_features

        return Features(dinov2_features(self.model, images, self.batch_size))


def choose_networks(cfg: EvalConfig, image_shape: tuple[int, ...]) -> list[str]:
    """The feature networks to run for images of shape (C, H, W)."""
    if list(cfg.features) != ["auto"]:
        return [f for f in dict.fromkeys(cfg.features) if f != "auto"]
    if tuple(image_shape) == FMNIST_SHAPE:
        return ["fmnist"]
    return ["inception"] + (["dinov2"] if cfg.dinov2_weights else [])


def build_networks(names: list[str], cfg: EvalConfig, device: torch.device) -> list[FeatureNet]:
    builders = {
        "fmnist": lambda: FMNISTFeatures(device, cfg.batch_size),
        "inception": lambda: InceptionFeatures(cfg.inception_weights, device, cfg.batch_size, cfg.inception_resize),
        "dinov2": lambda: DINOv2Features(cfg.dinov2_weights, cfg.dinov2_model, device, cfg.batch_size),
    }
    return [builders[n]() for n in names]


# ----------------------------------------------------------------------------------- references


@dataclass
class Reference:
    """Per network: features (N, D) of reference images and/or Gaussian statistics (mu, sigma)."""

    source: str
    features: dict[str, Features] = field(default_factory=dict)
    # network -> kind -> (mu, sigma)
    stats: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def gaussian(self, network: str, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(mu, sigma) of the reference for a network's `main` or `spatial` features, or None; computed
        from the features once, then kept."""
        if kind not in self.stats.get(network, {}):
            feats = self.features.get(network)
            values = None if feats is None else (feats.main if kind == "main" else feats.spatial)
            if values is None:
                return None
            self.stats.setdefault(network, {})[kind] = feature_stats(values)
        return self.stats[network][kind]


def stat_keys(network: str, kind: str) -> tuple[str, str]:
    if network == "inception":
        return ADM_STAT_KEYS["pool" if kind == "main" else "spatial"]
    return f"{network}_mu", f"{network}_sigma"


def load_reference(path: str | Path, networks: list[FeatureNet]) -> Reference:
    arrays = read_npz(path)
    ref = Reference(source=str(path))
    for net in networks:
        for kind in ("main", "spatial"):
            mu_key, sigma_key = stat_keys(net.name, kind)
            if mu_key in arrays and sigma_key in arrays:
                ref.stats.setdefault(net.name, {})[kind] = (arrays[mu_key], arrays[sigma_key])
    if "arr_0" in arrays:
        images, _ = batch_images(arrays, str(path))
        for net in networks:
            ref.features[net.name] = net(images)
    missing = [n.name for n in networks if n.name not in ref.features and "main" not in ref.stats.get(n.name, {})]
    if missing:
        keys = ", ".join("/".join(stat_keys(n, "main")) for n in missing)
        raise UserError(f"reference {path} has neither images (arr_0) nor statistics ({keys}) for {', '.join(missing)}")
    return ref


def write_reference(images: torch.Tensor, networks: list[FeatureNet], path: str | Path) -> Path:
    """An ADM-style reference batch: images (N, C, H, W) uint8 under arr_0 and every network's statistics."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    for net in networks:
        feats = net(images)
        for kind, values in (("main", feats.main), ("spatial", feats.spatial)):
            if values is not None:
                arrays.update(zip(stat_keys(net.name, kind), feature_stats(values)))
    return atomic_write_npz(path, **arrays)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sprintdit")


def fmnist_reference(root: str | Path, net: FMNISTFeatures) -> Reference:
    """Classifier features of the Fashion-MNIST test split (32x32), cached per classifier and data."""
    from .fashion_mnist import FashionMNIST
    from .metrics.fmnist_classifier import WEIGHTS, read_record

    data = FashionMNIST(root, split="test", resolution=FMNIST_SHAPE[1])
    key = hashlib.sha256(read_record(WEIGHTS)["sha256"].encode() + data.images.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / f"fmnist_test_{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                cached = torch.from_numpy(f["features"])
            return Reference(f"Fashion-MNIST test split ({len(data)} images, cached)", {"fmnist": Features(cached)})
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache is rebuilt below
    feats = net(data.images)
    try:
        atomic_write_npz(path, features=feats.main.numpy())
    except OSError as err:  # the cache only saves time: go on without it
        warn(
            f"cannot write the reference cache {path} ({err.strerror or err}); it is recomputed next time (set "
            f"{CACHE_ENV} to a writable folder)"
        )
    return Reference(f"Fashion-MNIST test split ({len(data)} images)", {"fmnist": Features(feats.main)})


def default_reference(cfg: EvalConfig, networks: list[FeatureNet], data_root: str | None) -> Reference:
    if cfg.ref is not None:
        return load_reference(cfg.ref, networks)
    if [n.name for n in networks] == ["fmnist"] and data_root is not None:
        return fmnist_reference(data_root, networks[0])
    raise UserError("give a reference batch: --ref REF.npz (ADM layout: images under arr_0 and/or mu/sigma statistics)")


# ----------------------------------------------------------------------------------- metrics

# below this (or below the feature dimension) evaluate warns that a Frechet distance is unreliable
RELIABLE_SAMPLES = 1000


def score(features: Features, net: str, ref: Reference, labels: torch.Tensor | None) -> dict[str, float]:
    """The metrics of one network's sample features against the reference."""
    out: dict[str, float] = {}
    frechet_name = "fdd" if net == "dinov2" else "fid"
    n, dim = features.main.shape
    if n < max(RELIABLE_SAMPLES, dim):
        print(
            f"warning: {frechet_name} from {n} samples with {net} features ({dim} dims) is biased high and noisy (a "
            f"covariance needs "
            f"more samples than dims; papers use 50,000): compare only at equal sample counts",
            file=sys.stderr,
        )
    for kind, name in (("main", frechet_name), ("spatial", "sfid")):
        values = features.main if kind == "main" else features.spatial
        target = ref.gaussian(net, kind)
        if values is not None and target is not None:
            out[name] = frechet_distance(*feature_stats(values), *target)
    real = ref.features.get(net)
    if real is not None and net != "dinov2":
        quality = prdc(real.main, features.main)
        out.update(precision=quality.precision, recall=quality.recall)
        if net == "fmnist":
            out.update(density=quality.density, coverage=quality.coverage)
    if features.logits is not None:
        out["is"] = inception_score(features.logits)
        if labels is not None and net == "fmnist":
            if len(labels) and int(labels.max()) >= features.logits.shape[1]:
                raise UserError(
                    f"labels must be in [0, {features.logits.shape[1] - 1}] for the {net} classifier, found "
                    f"{int(labels.max())}"
                )
            out["class_agreement"] = class_agreement(features.logits, labels)
    return out


class Evaluator:
    """Feature networks and reference, built once for images of one shape; call it on sample sets."""

    def __init__(
        self, cfg: EvalConfig, image_shape: tuple[int, ...], device: torch.device, data_root: str | None = None
    ):
        names = choose_networks(cfg, tuple(image_shape))
        if "fmnist" in names and tuple(image_shape) != FMNIST_SHAPE:
            raise UserError(
                f"the fmnist feature network scores 1x32x32 images, got {'x'.join(map(str, image_shape))}; use "
                f"inception"
            )
        self.networks = build_networks(names, cfg, device)
        self.ref = default_reference(cfg, self.networks, data_root)
        self.image_shape = tuple(image_shape)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        """images (N, C, H, W) uint8 -> {"num_samples", "reference", "metrics": {network: {metric: value}}}."""
        if len(images) < 2:
            raise UserError(f"metrics need at least 2 samples, got {len(images)}")
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(f"samples are {tuple(images.shape[1:])} but the evaluator was built for {self.image_shape}")
        metrics = {net.name: score(net(images), net.name, self.ref, labels) for net in self.networks}
        return {"num_samples": len(images), "reference": self.ref.source, "metrics": metrics}


def eval_labels_and_seeds(cfg: EvalConfig, num_classes: int) -> tuple[list[int], list[int]]:
    """Labels cycle through the classes (balanced), sample i has seed seed_start + i."""
    return [i % num_classes for i in range(cfg.num_samples)], [cfg.seed_start + i for i in range(cfg.num_samples)]


@dataclass
class Scored:
    """What `SamplingRun.score` gives rank 0: the results (as `Evaluator` returns them), the images (N, C, H, W)
    uint8 with their labels, the seconds spent sampling (pixel decoding included) and the evaluator for reuse."""

    results: dict
    images: torch.Tensor
    labels: list[int]
    sample_seconds: float
    evaluator: Evaluator


def to_uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    """Samples (N, C, H, W) in [-1, 1] -> uint8, quantised exactly as saved images are."""
    from .images import to_uint8

    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()


def format_table(results: dict) -> str:
    rows = [(net, metric, value) for net, metrics in results["metrics"].items() for metric, value in metrics.items()]
    lines = [
        f"{results['num_samples']} samples vs {results['reference']}",
        f"{'features':<10} {'metric':<16} {'value':>10}",
    ]
    lines += [f"{net:<10} {metric:<16} {value:>10.4f}" for net, metric, value in rows]
    return "\n".join(lines)


def flatten(results: dict) -> dict[str, float]:
    """{"fmnist/fid": ..., ...} for metric logs."""
    return {f"{net}/{k}": v for net, metrics in results["metrics"].items() for k, v in metrics.items()}
