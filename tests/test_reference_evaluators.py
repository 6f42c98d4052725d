"""Our evaluation against the field's reference code, on the same random seeded weights and uint8 images.

References (installed by the `test` extra; each test is skipped, with the reason, where its package is absent). None
of them may import torchvision, which does not import beside the torch these tests run on, so:
- torch-fidelity's InceptionV3 (`feature_extractor_inceptionv3.py`) is imported under a bare package entry: the
  package's `__init__` imports torchvision, that module and the ones it imports do not;
- torch-fidelity's Inception Score (`metric_isc.isc_features_to_metric`) and pytorch-fid's Frechet distance
  (`fid_score.calculate_frechet_distance`) are read from their installed files and run on their own: their modules
  import torchvision at the top, the functions use numpy, scipy and torch only;
- prdc's `compute_prdc` (its pairwise distances come from scikit-learn, or, where scikit-learn is absent, from a numpy
  stand-in for `sklearn.metrics.pairwise_distances`; the k-NN radii and the four formulas stay prdc's);
- DINOv2: transformers' `Dinov2Model` (the port of facebookresearch/dinov2) with the official checkpoint layout's
  weights renamed to its keys, behind dgm-eval's FDD transform (`Resize((224, 224), BICUBIC)` of a PIL image, which
  torchvision hands to Pillow, then `ToTensor` and ImageNet `Normalize`) written here with Pillow and numpy.
The negative controls show the comparisons catch a wrong resize.
"""

import ast
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from conftest import randomised
from PIL import Image

from sprintdit.metrics import feature_stats, frechet_distance, inception_score, prdc
from sprintdit.metrics.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    DINOv2ViT,
    ViTConfig,
    dinov2_features,
    tensor_preprocess,
)
from sprintdit.metrics.inception import INPUT_SIZE as INCEPTION_SIZE
from sprintdit.metrics.inception import (
    PYTORCH_FID,
    TF,
    InceptionV3FID,
    inception_features,
    load_inception,
    preprocess,
)

SIZES = [(299, 299), (256, 256), (64, 48), (37, 300)]  # (H, W): the network's own, ImageNet's, two non-square
IMAGES_PER_SIZE = 4
FEATURE_TOL = dict(rtol=1e-4, atol=1e-4)  # float32 through ~100 layers, two implementations
DINO_SIZES = [(224, 224), (32, 40), (300, 256)]
TINY_DINO = ViTConfig(dim=64, depth=2, heads=2, pretrain_grid=INPUT_SIZE // 14)  # no position interpolation at 224
K = 3


def images(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Smooth-ish uint8 images (n, 3, H, W): a random low-resolution pattern upsampled, plus noise, so that a resize's
    rounding matters and the features are not all alike."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 5, 7, generator=g) * 255
    x = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    return (x + torch.randn(n, 3, *size, generator=g) * 20).clamp(0, 255).round().to(torch.uint8)


def needs(package: str) -> str:
    """The package's folder, or skip with the reason."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"reference package {package} is not installed (pip install -e '.[test]')")
    return spec.submodule_search_locations[0]


def import_without_package_init(package: str, module: str, monkeypatch) -> types.ModuleType:
    """package.module, imported under a bare package entry so that the package's __init__ does not run."""
    bare = types.ModuleType(package)
    bare.__path__ = [needs(package)]
    monkeypatch.setitem(sys.modules, package, bare)
    return importlib.import_module(f"{package}.{module}")


def function_from_file(package: str, filename: str, name: str, namespace: dict):
    """The top-level function `name` of the package's installed file, run alone with the names in `namespace`."""
    path = f"{needs(package)}/{filename}"
    tree = ast.parse(open(path).read(), path)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


# ----------------------------------------------------------------------------------- InceptionV3


def calibrated(model: InceptionV3FID) -> InceptionV3FID:
    """Random weights whose BatchNorm statistics are those of a batch of images, so that every layer passes on a
    signal of order one and the pool features differ from image to image (with arbitrary statistics the signal dies
    out over the ~90 layers, and the features hardly depend on the input)."""
    batch = preprocess(images(2 * IMAGES_PER_SIZE, (INCEPTION_SIZE, INCEPTION_SIZE), seed=99))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(batch)
    return model.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(calibrated(randomised(InceptionV3FID())).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_pair(inception_file):
    """(ours, torch-fidelity's) with the same weights, and the features of both on the same images at every size."""
    with pytest.MonkeyPatch.context() as mp:
        fidelity = import_without_package_init("torch_fidelity", "feature_extractor_inceptionv3", mp)
        reference = fidelity.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_file)
        )
    ours = load_inception(inception_file)
    batches = [images(IMAGES_PER_SIZE, size, seed) for seed, size in enumerate(SIZES)]
    with torch.no_grad():
        theirs = [reference(x) for x in batches]
    return ours, batches, theirs


@pytest.mark.parametrize("index", range(len(SIZES)), ids=[f"{h}x{w}" for h, w in SIZES])
def test_inception_pool_and_logits_equal_torch_fidelity(inception_pair, index):
    ours, batches, theirs = inception_pair
    mine = inception_features(ours, batches[index], convention=TF)
    pool, logits = theirs[index]
    torch.testing.assert_close(mine["pool"], pool, **FEATURE_TOL)
    torch.testing.assert_close(mine["logits"], logits, **FEATURE_TOL)


def test_a_wrong_inception_resize_is_caught(inception_pair):
    """Negative control: pytorch-fid's torch bilinear resize (and 127.5 scaling) against torch-fidelity's TF one."""
    ours, batches, theirs = inception_pair
    index = SIZES.index((64, 48))
    wrong = inception_features(ours, batches[index], convention=PYTORCH_FID)
    assert not torch.allclose(wrong["pool"], theirs[index][0], **FEATURE_TOL)


def test_inception_score_with_the_split_convention_equals_torch_fidelity(inception_pair):
    """ADM's consecutive 5,000-sample splits are torch-fidelity's N / 5,000 splits of its unshuffled samples."""
    _, _, theirs = inception_pair
    isc = function_from_file("torch_fidelity", "metric_isc.py", "isc_features_to_metric", {"np": np, "torch": torch})
    namespace = isc.__globals__
    namespace.update(KEY_METRIC_ISC_MEAN="mean", KEY_METRIC_ISC_STD="std")
    logits = torch.cat([logits for _, logits in theirs]) * 50  # sharper than random weights give, to spread the splits
    split = 4
    expected = isc(logits, splits=len(logits) // split, shuffle=False)
    mine = inception_score(logits, split_size=split)
    assert (mine.mean, mine.std) == (
        pytest.approx(expected["mean"], rel=1e-9),
        pytest.approx(expected["std"], rel=1e-9),
    )
    one_split = isc(logits, splits=1, shuffle=False)["mean"]
    assert inception_score(logits, split_size=0).mean == pytest.approx(one_split, rel=1e-9)
    assert abs(one_split - mine.mean) > 1e-3 * one_split  # the split convention matters on these logits


def test_fid_equals_pytorch_fid(inception_pair):
    """Our FID (our features, our Frechet distance) against pytorch-fid's Frechet distance of torch-fidelity's
    features, two image sets; the features' covariances are well conditioned only on a slice (N samples < 2048
    dims), so the distance is checked on the first dims of the pool features and on wide Gaussian statistics."""
    ours, batches, theirs = inception_pair
    frechet = function_from_file(
        "pytorch_fid", "fid_score.py", "calculate_frechet_distance", {"np": np, "linalg": scipy.linalg}
    )
    dims = len(SIZES) * IMAGES_PER_SIZE // 2 - 2  # fewer than the samples of each set
    mine = torch.cat([inception_features(ours, x)["pool"] for x in batches])[:, :dims]
    ref = torch.cat([pool for pool, _ in theirs])[:, :dims].double().numpy()
    half = len(mine) // 2
    expected = frechet(*feature_stats(ref[:half]), *feature_stats(ref[half:]))
    assert frechet_distance(*feature_stats(mine[:half]), *feature_stats(mine[half:])) == pytest.approx(
        expected, rel=1e-4
    )
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 64)), rng.normal(size=(600, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 1
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(
        frechet(*feature_stats(a), *feature_stats(b)), rel=1e-9
    )


# ------------------------------------------------------------------------- precision, recall, density, coverage


def euclidean(x, y, metric="euclidean", n_jobs=None):
    """A stand-in for sklearn.metrics.pairwise_distances(x, y, metric="euclidean"), in float64 as sklearn's."""
    return scipy.spatial.distance.cdist(x.astype(np.float64), y.astype(np.float64), metric)


@pytest.fixture
def compute_prdc(monkeypatch):
    needs("prdc")
    if importlib.util.find_spec("sklearn") is None:
        stand_in = types.ModuleType("sklearn")
        stand_in.metrics = types.SimpleNamespace(pairwise_distances=euclidean)
        monkeypatch.setitem(sys.modules, "sklearn", stand_in)
        monkeypatch.setitem(sys.modules, "sklearn.metrics", stand_in.metrics)
        monkeypatch.delitem(sys.modules, "prdc.prdc", raising=False)
        monkeypatch.delitem(sys.modules, "prdc", raising=False)
    return importlib.import_module("prdc").compute_prdc


def test_prdc_equals_the_prdc_package(compute_prdc, inception_pair):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(250, 16)) * 1.3 + 0.4).astype(np.float32)  # wider and shifted: every value inside (0, 1)
    _, _, theirs = inception_pair
    pools = torch.cat([pool for pool, _ in theirs]).numpy()
    for r, f in ((real, fake), (pools[::2], pools[1::2])):
        expected = compute_prdc(r, f, nearest_k=K)
        mine = prdc(torch.from_numpy(r), torch.from_numpy(f), k=K)
        for name in ("precision", "recall", "density", "coverage"):
            assert getattr(mine, name) == pytest.approx(float(expected[name]), abs=1e-6), name


# ----------------------------------------------------------------------------------- DINOv2 (FDD)


def hf_state(official: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The official DINOv2 checkpoint keys renamed to transformers' Dinov2Model (qkv split into three)."""
    out = {
        "embeddings.cls_token": official["cls_token"],
        "embeddings.mask_token": official["mask_token"],
        "embeddings.position_embeddings": official["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": official["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": official["patch_embed.proj.bias"],
        "layernorm.weight": official["norm.weight"],
        "layernorm.bias": official["norm.bias"],
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = official[f"{ours}attn.qkv.{kind}"].chunk(3)
            out.update({f"{theirs}attention.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
            renamed = (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("attn.proj", "attention.o_proj"),
                ("mlp.fc1", "mlp.fc1"),
            )
            for a, b in (*renamed, ("mlp.fc2", "mlp.fc2")):
                out[f"{theirs}{b}.{kind}"] = official[f"{ours}{a}.{kind}"]
        out[f"{theirs}layer_scale1.lambda1"] = official[f"{ours}ls1.gamma"]
        out[f"{theirs}layer_scale2.lambda1"] = official[f"{ours}ls2.gamma"]
    return out


def fdd_transform(batch: torch.Tensor) -> torch.Tensor:
    """dgm-eval's FDD transform of uint8 images (N, 3, H, W): Pillow's bicubic resize of each to 224x224, ToTensor
    (/ 255), ImageNet Normalize."""
    out = []
    for image in batch.permute(0, 2, 3, 1).numpy():
        resized = np.asarray(Image.fromarray(image).resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC), np.float32) / 255
        out.append((resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def dino_pair():
    """(ours, transformers' Dinov2Model) with the same random weights in the official layout."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("reference package transformers is not installed (pip install -e '.[test]')")
    from transformers import Dinov2Config, Dinov2Model

    ours = randomised(DINOv2ViT(TINY_DINO)).eval()
    config = Dinov2Config(
        hidden_size=TINY_DINO.dim,
        num_hidden_layers=TINY_DINO.depth,
        num_attention_heads=TINY_DINO.heads,
        mlp_ratio=4,
        patch_size=TINY_DINO.patch,
        image_size=INPUT_SIZE,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    reference = Dinov2Model(config).eval()
    reference.load_state_dict(hf_state(ours.state_dict(), TINY_DINO.depth))
    return ours, reference


@pytest.mark.parametrize("size", DINO_SIZES, ids=[f"{h}x{w}" for h, w in DINO_SIZES])
def test_dinov2_features_equal_the_official_layout_behind_dgm_eval_resize(dino_pair, size):
    ours, reference = dino_pair
    batch = images(IMAGES_PER_SIZE, size, seed=10)
    with torch.no_grad():
        expected = reference(pixel_values=fdd_transform(batch)).pooler_output
    torch.testing.assert_close(dinov2_features(ours, batch), expected, **FEATURE_TOL)


def test_a_wrong_dinov2_resize_is_caught(dino_pair):
    """Negative control: the float bicubic resize rounded once at the end (our FDD resize before) gives other
    features than Pillow's uint8 resize, beyond the tolerance the comparison uses."""
    ours, reference = dino_pair
    batch = images(IMAGES_PER_SIZE, (32, 40), seed=10)
    with torch.no_grad():
        expected = reference(pixel_values=fdd_transform(batch)).pooler_output
        wrong = ours(tensor_preprocess(batch, INPUT_SIZE))
    assert not torch.allclose(wrong, expected, **FEATURE_TOL)
