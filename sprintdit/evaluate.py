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
precision/recall. The Fashion-MNIST test split's features are computed once and cached. Images are read from an
npz a block at a time (`NpzBatch.image_blocks`) and only their features are kept, so a 50,000-image batch is never
held in memory.

Every result carries its provenance (`provenance`): the convention it was made under (number of samples, the
reference's identity, each feature network's weights sha256 and resize, the Inception Score's split size), which
`sprintdit evaluate --compare` requires to be equal, and the setting (sampler, steps, NFE, guidance, seeds) and the
package versions, shown side by side.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from .config import IS_SPLIT_SIZE, EvalConfig
from .errors import UserError, warn
from .files import atomic_write_npz, sha256_file
from .metrics import class_agreement, feature_stats, frechet_distance, inception_score, prdc
from .metrics.fmnist_classifier import INPUT_SHAPE as FMNIST_SHAPE

DEFAULT_BATCH = EvalConfig.batch_size  # images per block read from an npz

ZIP_MAGIC = b"PK"  # an npz file is a zip archive (its first bytes)
IMAGES_KEY, LABELS_KEY = "arr_0", "arr_1"  # the ADM layout's arrays
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
HEAD_SHOWN = 8  # bytes of a file that is not an npz quoted in the error
CACHE_ENV = "SPRINTDIT_CACHE"  # where reference features are cached (default ~/.cache/sprintdit)
ADM_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # the inception keys of ADM reference batches


# ----------------------------------------------------------------------------------- npz batches


class NpzBatch:
    """An npz file in the ADM layout, opened without reading its arrays: `array` reads one (statistics, labels),
    `image_blocks` streams the images under arr_0 a block at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"npz file {self.path} does not exist")
        with open(self.path, "rb") as f:
            head = f.read(HEAD_SHOWN)
        if not head.startswith(ZIP_MAGIC):
            raise UserError(
                f"{self.path} is not an npz file (an npz is a zip archive of arrays, as np.savez writes; this file "
                f"starts with {head!r})"
            )
        try:
            with zipfile.ZipFile(self.path) as z:
                self.keys = [name.removesuffix(".npy") for name in z.namelist()]
            self.shape = self._images_shape() if IMAGES_KEY in self.keys else None  # (N, C, H, W)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a zip cut short: BadZipFile or EOFError
            raise UserError(f"{self.path} is not a readable npz file ({str(err).splitlines()[0]})") from None

    def array(self, key: str) -> np.ndarray:
        try:
            with np.load(self.path, allow_pickle=False) as f:
                return f[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{self.path} is not a readable npz file ({str(err).splitlines()[0]})") from None

    def _open_images(self):
        """arr_0's member, positioned after its .npy header, and the header's (shape, fortran order, dtype)."""
        member = zipfile.ZipFile(self.path).open(IMAGES_KEY + ".npy")
        version = np.lib.format.read_magic(member)
        if version not in NPY_HEADER_READERS:
            raise UserError(f"{self.path}: arr_0 is in .npy format version {version}, which is not read here")
        return member, NPY_HEADER_READERS[version](member)

    def _images_shape(self) -> tuple[int, int, int, int]:
        member, (shape, fortran, dtype) = self._open_images()
        member.close()
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise UserError(f"{self.path}: arr_0 must be uint8 images (N, H, W, 1 or 3), got {dtype} {shape}")
        n, h, w, c = shape
        return n, c, h, w

    def image_blocks(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images under arr_0 as uint8 tensors (B, C, H, W), batch_size at a time, in order."""
        if self.shape is None:
            raise UserError(f"{self.path} has no arr_0 (the ADM layout keeps the images there)")
        n, c, h, w = self.shape
        member, _ = self._open_images()
        with member:
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                data = member.read(count * h * w * c)
                if len(data) != count * h * w * c:
                    raise UserError(f"{self.path}: arr_0 is cut short after {start} images")
                block = np.frombuffer(data, np.uint8).reshape(count, h, w, c)
                yield torch.from_numpy(block.transpose(0, 3, 1, 2).copy())  # (B, C, H, W)

    def images(self) -> torch.Tensor:
        """All the images (N, C, H, W) uint8 at once, for batches that are meant to be held."""
        return torch.cat(list(self.image_blocks(max(1, self.shape[0] if self.shape else 1))))

    def labels(self) -> torch.Tensor | None:
        """arr_1 (N,) as int64, or None when the file has no labels."""
        if LABELS_KEY not in self.keys:
            return None
        labels = self.array(LABELS_KEY)
        count = self.shape[0] if self.shape else 0
        if labels.shape != (count,):
            raise UserError(
                f"{self.path}: arr_1 must hold one label per image, got shape {labels.shape} for {count} images"
            )
        if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
            raise UserError(
                f"{self.path}: arr_1 must hold non-negative integer class labels, got {labels.dtype} values such as "
                f"{labels[:3].tolist()}"
            )
        return torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------- feature networks


@dataclass
class Features:
    """What a feature network gives for a set of images: `main` (N, D) for the Frechet distance and
    precision/recall, optional `spatial` (N, D') for sFID and `logits` (N, classes) for IS / agreement."""

    main: torch.Tensor
    spatial: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class FeatureNet(Protocol):
    """A named feature network: images uint8 (N, C, H, W) -> Features; its weights' sha256 and how it resizes."""

    name: str
    resize: str
    weights_sha256: str

    def __call__(self, images: torch.Tensor) -> Features: ...


class FMNISTFeatures(FeatureNet):
    name = "fmnist"
    resize = "none"  # the classifier reads 1x32x32 images as they are

    def __init__(self, device: torch.device, batch_size: int):
        from .metrics import load_classifier
        from .metrics.fmnist_classifier import WEIGHTS, read_record

        self.model = load_classifier(device=device)
        self.batch_size = batch_size
        self.weights_sha256 = read_record(WEIGHTS)["sha256"]

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
        self.weights_sha256 = sha256_file(weights)

    def __call__(self, images: torch.Tensor) -> Features:
        from .metrics.inception import inception_features

        out = inception_features(self.model, images, self.batch_size, self.resize)
        return Features(out["pool"], spatial=out["spatial"], logits=out["logits"])


class DINOv2Features(FeatureNet):
    name = "dinov2"

    def __init__(self, weights: str | None, preset: str, device: torch.device, batch_size: int):
        from .metrics.dinov2 import FDD_RESIZE, load_dinov2

        self.model = load_dinov2(weights, preset, device)
        self.batch_size, self.resize = batch_size, FDD_RESIZE
        self.weights_sha256 = sha256_file(weights)

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


def extract(networks: list[FeatureNet], blocks: Iterable[torch.Tensor]) -> dict[str, Features]:
    """Every network's features of a stream of uint8 image blocks (B, C, H, W): one pass, only features kept."""
    parts: dict[str, list[Features]] = {net.name: [] for net in networks}
    for block in blocks:
        for net in networks:
            parts[net.name].append(net(block))
    return {name: concat(features) for name, features in parts.items()}


def concat(parts: list[Features]) -> Features:
    """The Features of consecutive blocks, joined along the samples."""

    def join(kind: str) -> torch.Tensor | None:
        values = [getattr(p, kind) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Features(join("main"), spatial=join("spatial"), logits=join("logits"))


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
    identity: dict[str, str] = field(default_factory=dict)  # what the scores were made against: path and sha256
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


def load_reference(path: str | Path, networks: list[FeatureNet], batch_size: int = DEFAULT_BATCH) -> Reference:
    batch = NpzBatch(path)
    ref = Reference(source=str(path), identity={"path": str(path), "sha256": sha256_file(path)})
    for net in networks:
        for kind in ("main", "spatial"):
            mu_key, sigma_key = stat_keys(net.name, kind)
            if mu_key in batch.keys and sigma_key in batch.keys:
                ref.stats.setdefault(net.name, {})[kind] = (batch.array(mu_key), batch.array(sigma_key))
    if batch.shape is not None:
        ref.features = extract(networks, batch.image_blocks(batch_size))
    missing = [n.name for n in networks if n.name not in ref.features and "main" not in ref.stats.get(n.name, {})]
    if missing:
        keys = ", ".join("/".join(stat_keys(n, "main")) for n in missing)
        raise UserError(f"reference {path} has neither images (arr_0) nor statistics ({keys}) for {', '.join(missing)}")
    return ref


def write_reference(images: torch.Tensor, networks: list[FeatureNet], path: str | Path) -> Path:
    """An ADM-style reference batch: images (N, C, H, W) uint8 under arr_0 and every network's statistics."""
    arrays = {IMAGES_KEY: images.permute(0, 2, 3, 1).numpy()}
    for net in networks:
        feats = net(images)
        for kind, values in (("main", feats.main), ("spatial", feats.spatial)):
            if values is not None:
                arrays.update(zip(stat_keys(net.name, kind), feature_stats(values)))
    return atomic_write_npz(path, **arrays)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sprintdit")


def fmnist_reference(root: str | Path, net: FMNISTFeatures) -> Reference:
    """Classifier features of the Fashion-MNIST test split (32x32), cached per classifier and data."""
    from .fashion_mnist import FashionMNIST
    from .metrics.fmnist_classifier import WEIGHTS, read_record

    data = FashionMNIST(root, split="test", resolution=FMNIST_SHAPE[1])
    identity = {"path": f"Fashion-MNIST test split in {root}", "sha256": sha256_bytes(data.images.numpy().tobytes())}
    key = hashlib.sha256(read_record(WEIGHTS)["sha256"].encode() + data.images.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / f"fmnist_test_{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                cached = torch.from_numpy(f["features"])
            return Reference(
                f"Fashion-MNIST test split ({len(data)} images, cached)", {"fmnist": Features(cached)}, identity
            )
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
    return Reference(f"Fashion-MNIST test split ({len(data)} images)", {"fmnist": Features(feats.main)}, identity)


def default_reference(cfg: EvalConfig, networks: list[FeatureNet], data_root: str | None) -> Reference:
    if cfg.ref is not None:
        return load_reference(cfg.ref, networks, cfg.batch_size)
    if [n.name for n in networks] == ["fmnist"] and data_root is not None:
        return fmnist_reference(data_root, networks[0])
    raise UserError("give a reference batch: --ref REF.npz (ADM layout: images under arr_0 and/or mu/sigma statistics)")


# ----------------------------------------------------------------------------------- metrics

# below this (or below the feature dimension) evaluate warns that a Frechet distance is unreliable
RELIABLE_SAMPLES = 1000


def score(
    features: Features, net: str, ref: Reference, labels: torch.Tensor | None, is_split_size: int = IS_SPLIT_SIZE
) -> dict[str, float]:
    """The metrics of one network's sample features against the reference (the Inception Score over consecutive
    splits of `is_split_size` samples, with the splits' standard deviation)."""
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
        inception = inception_score(features.logits, is_split_size)
        out.update({"is": inception.mean, "is_std": inception.std})
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

        self.is_split_size = cfg.is_split_size
        self.batch_size = cfg.batch_size

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        """images (N, C, H, W) uint8 -> {"num_samples", "reference", "metrics": {network: {metric: value}},
        "provenance": {"convention", "versions"}}."""
        return self.score_blocks(images.split(self.batch_size), tuple(images.shape), labels)

    def score_blocks(self, blocks: Iterable[torch.Tensor], shape: tuple[int, ...], labels: torch.Tensor | None) -> dict:
        """As calling it, on the images (N, C, H, W) = `shape` given as a stream of uint8 blocks (B, C, H, W)."""
        if shape[0] < 2:
            raise UserError(f"metrics need at least 2 samples, got {shape[0]}")
        if tuple(shape[1:]) != self.image_shape:
            raise UserError(f"samples are {tuple(shape[1:])} but the evaluator was built for {self.image_shape}")
        features = extract(self.networks, blocks)
        metrics = {name: score(feats, name, self.ref, labels, self.is_split_size) for name, feats in features.items()}
        provenance = {"convention": self.convention(shape[0]), "versions": versions()}
        return {"num_samples": shape[0], "reference": self.ref.source, "metrics": metrics, "provenance": provenance}

    def convention(self, num_samples: int) -> dict:
        """What a score depends on besides the samples' model: scores compare only when these agree."""
        return {
            "num_samples": num_samples,
            "reference": self.ref.identity,
            "networks": {
                net.name: {"weights_sha256": net.weights_sha256, "resize": net.resize} for net in self.networks
            },
            "is_split_size": self.is_split_size,
        }


def versions() -> dict[str, str]:
    from . import __version__

    return {"sprintdit": __version__, "torch": torch.__version__}


def sampling_setting(scfg, nfe: int | None, seeds: list[int]) -> dict:
    """How generated samples were made: the sampling settings (sampler, steps, guidance kind, scale and interval),
    network evaluations per image (NFE) and the seeds."""
    return {"sample": asdict(scfg), "nfe": nfe, "seed_start": seeds[0], "num_seeds": len(seeds)}


# ----------------------------------------------------------------------------------- comparing two results


def flat_fields(record: dict, prefix: str = "") -> dict[str, object]:
    """A nested record as {"a.b.c": value}."""
    out: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def compare_results(a: dict, b: dict, names: tuple[str, str]) -> str:
    """The metrics of two results side by side with their differences (B - A), then their settings; a one-line
    UserError naming the first field of the convention that differs (scores made under different conventions do
    not compare)."""
    for name, result in zip(names, (a, b)):
        if "convention" not in result.get("provenance", {}):
            raise UserError(f"{name} records no convention (written before scores recorded one); score it again")
    conventions = [flat_fields(r["provenance"]["convention"]) for r in (a, b)]
    differ = [
        k
        for k in sorted(conventions[0].keys() | conventions[1].keys())
        if conventions[0].get(k) != conventions[1].get(k)
    ]
    if differ:
        more = f" (and {len(differ) - 1} more field(s))" if len(differ) > 1 else ""
        raise UserError(
            f"{names[0]} and {names[1]} were scored under different conventions: {differ[0]} is "
            f"{conventions[0].get(differ[0])!r} vs {conventions[1].get(differ[0])!r}{more}"
        )
    metrics = [flatten(a), flatten(b)]
    lines = [f"{'metric':<24} {'A':>12} {'B':>12} {'B - A':>12}"]
    for key in sorted(metrics[0].keys() | metrics[1].keys()):
        va, vb = metrics[0].get(key, math.nan), metrics[1].get(key, math.nan)
        lines.append(f"{key:<24} {va:>12.4f} {vb:>12.4f} {vb - va:>12.4f}")
    settings = [flat_fields({k: v for k, v in r["provenance"].items() if k != "convention"}) for r in (a, b)]
    for key in sorted(settings[0].keys() | settings[1].keys()):
        va, vb = settings[0].get(key), settings[1].get(key)
        lines.append(f"{key:<24} {va!s:>12} {vb!s:>12}{'  differs' if va != vb else ''}")
    return "\n".join([f"A: {names[0]}", f"B: {names[1]}", *lines])


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
