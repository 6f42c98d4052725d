import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomised
from safetensors.torch import save_file

from sprintdit.errors import UserError
from sprintdit.metrics.dinov2 import (
    PRESETS,
    Attention,
    DINOv2ViT,
    ViTConfig,
    dinov2_features,
    load_dinov2,
    swiglu_hidden,
)
from sprintdit.metrics.inception import (
    INPUT_SIZE,
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_CHANNELS,
    SPATIAL_DIM,
    PYTORCH_FID,
    TF,
    InceptionV3FID,
    fid_avg_pool,
    inception_features,
    load_inception,
    preprocess,
    tf1_resize,
)

TINY_VIT = ViTConfig(dim=64, depth=2, heads=2, pretrain_grid=4)  # tests only: 4x4 pretrain grid, interpolated to 16x16
TINY_SWIGLU_VIT = ViTConfig(dim=48, depth=1, heads=2, swiglu=True, pretrain_grid=3)
# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with 1008 classes (+16,392):
FID_INCEPTION_PARAMETERS = 23_850_960
VIT_L_DIM, VIT_L_POSITIONS = 1024, 1 + 37 * 37
VIT_L_PARAMETERS = 304_368_640  # dinov2_vitl14 as released (no buffers, so the state dict counts parameters only)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These batch-1/2 forwards run several times faster on one thread than with intra-op threads on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, channels: int = 3, size: tuple[int, int] = (32, 40), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def assert_one_line_naming(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


# InceptionV3 (FID)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    model = randomised(InceptionV3FID())
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_fid_inception_has_the_torchvision_layout_and_size():
    model = InceptionV3FID()
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS
    state = model.state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6e.branch7x7_2.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (NUM_LOGITS, POOL_DIM)
    assert model.Mixed_5b.branch1x1.bn.eps == pytest.approx(1e-3)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


@pytest.fixture(scope="module")
def inception_run(inception_file):
    """One forward at 299x299 for a batch of an RGB image and a grayscale one, with Mixed_6d's 1x1 branch kept."""
    model = load_inception(inception_file)
    captured = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    batch = torch.cat([images(1), images(1, channels=1, seed=2).expand(-1, 3, -1, -1)])  # (2, 3, 32, 40)
    features = inception_features(model, batch, batch_size=2)
    hook.remove()
    return model, batch, features, captured[0]


def test_inception_features_shapes_and_types(inception_run):
    _, _, features, _ = inception_run
    assert features["pool"].shape == (2, POOL_DIM)
    assert features["spatial"].shape == (2, SPATIAL_DIM)
    assert features["logits"].shape == (2, NUM_LOGITS)
    for values in features.values():
        assert values.dtype == torch.float32 and values.device.type == "cpu"
        assert torch.isfinite(values).all()


def test_inception_features_are_deterministic_and_independent_of_batching(inception_run):
    model, batch, features, _ = inception_run
    again = inception_features(model, batch, batch_size=1)
    for name, values in again.items():
        torch.testing.assert_close(values, features[name], rtol=1e-4, atol=1e-4)


def test_inception_spatial_is_mixed_6_conv_and_logits_have_no_bias(inception_run):
    model, _, features, conv = inception_run
    # sFID: TF's mixed_6/conv = Mixed_6d's 1x1 branch (N, 192, 17, 17); its first 7 channels flattened in NHWC order
    torch.testing.assert_close(features["spatial"], conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(2, -1))
    assert model.fc.bias.abs().max() > 0
    torch.testing.assert_close(features["logits"], features["pool"] @ model.fc.weight.T, rtol=1e-4, atol=1e-4)


def test_inception_preprocessing_repeats_grayscale_and_maps_to_unit_range():
    gray = images(2, channels=1, size=(20, 20))
    x = preprocess(gray)
    assert x.shape == (2, 3, INPUT_SIZE, INPUT_SIZE)
    torch.testing.assert_close(x, preprocess(gray.expand(-1, 3, -1, -1)))
    extremes = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)  # already 299x299: no resize
    extremes[..., 0, 0] = 255
    ends = preprocess(extremes, PYTORCH_FID)
    assert ends.min() == -1 and ends.max() == 1


def test_tf_convention_resizes_like_tensorflow_1x_and_centres_on_128():
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)  # (1, 1, 2, 2), columns 0 and 10
    up = tf1_resize(row, 4)  # source columns 0, 0.5, 1, 1.5 -> the last clamps to the edge
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(
        F.interpolate(row, size=(4, 4), mode="bilinear", align_corners=False)[0, 0, 0],
        torch.tensor([0.0, 2.5, 7.5, 10.0]),
    )
    x = images(2, size=(INPUT_SIZE, INPUT_SIZE))
    torch.testing.assert_close(preprocess(x, TF), (x.float() - 128) / 128)  # same size: no resampling
    from sprintdit.config import EvalConfig

    # one default: Python API = CLI
    assert torch.equal(preprocess(x), preprocess(x, TF)) and EvalConfig().inception_resize == TF
    assert preprocess(images(1, channels=1), TF).shape == (1, 3, INPUT_SIZE, INPUT_SIZE)
    with pytest.raises(UserError):
        preprocess(x, "pil")


def test_fid_average_pool_leaves_padding_out_of_the_average():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    sums = F.conv2d(F.pad(x, (1, 1, 1, 1)).reshape(6, 1, 7, 8), torch.ones(1, 1, 3, 3, dtype=torch.float64)).reshape(
        2, 3, 5, 6
    )
    counts = F.conv2d(
        F.pad(torch.ones(1, 1, 5, 6, dtype=torch.float64), (1, 1, 1, 1)), torch.ones(1, 1, 3, 3, dtype=torch.float64)
    )
    torch.testing.assert_close(fid_avg_pool(x), sums / counts)
    assert counts[0, 0, 0, 0] == 4  # a corner averages 4 pixels, not 9
    torch.testing.assert_close(fid_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))


def test_inception_loads_torch_fidelity_style_files(inception_file, tmp_path):
    """No BatchNorm step counters (torch-fidelity's converter writes none) and a DataParallel prefix still load."""
    state = torch.load(inception_file, weights_only=True)
    no_counters = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "fidelity.pth")
    loaded = load_inception(tmp_path / "fidelity.pth").state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


def test_inception_missing_file_is_one_line_naming_file_and_option(tmp_path):
    with pytest.raises(UserError) as error:
        load_inception(tmp_path / "nope.pth")
    assert_one_line_naming(error, "nope.pth", "pt_inception-2015-12-05-6726825d.pth", "--inception-weights")
    with pytest.raises(UserError) as error:
        load_inception(None)
    assert_one_line_naming(error, "no weights file given", "--inception-weights")


def test_inception_wrong_keys_and_shapes_are_reported(inception_file, tmp_path):
    state = torch.load(inception_file, weights_only=True)
    state["fc.kernel"] = state.pop("fc.weight")
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError) as error:
        load_inception(tmp_path / "bad.pth")
    assert_one_line_naming(
        error, "bad.pth", "missing: fc.weight", "unexpected: fc.kernel", "wrong shape: fc.bias", "--inception-weights"
    )


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"fc.weight": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(UserError) as error:
        load_inception(tmp_path / "unsafe.pth")
    assert_one_line_naming(error, "pickled Python objects", "unsafe.pth", "--inception-weights")
    assert "weights_only=False" not in str(error.value)


# DINOv2


@pytest.fixture(scope="module")
def tiny_dinov2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "tiny.pth"
    torch.save(randomised(DINOv2ViT(TINY_VIT)).state_dict(), path)
    return path


def test_dinov2_features_shapes_and_determinism(tiny_dinov2_file):
    model = load_dinov2(tiny_dinov2_file, preset=TINY_VIT)
    batch = images(3)
    first = dinov2_features(model, batch, batch_size=2)
    second = dinov2_features(model, batch, batch_size=3)
    assert first.shape == (3, TINY_VIT.dim) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)
    gray = dinov2_features(model, batch[:, :1])
    torch.testing.assert_close(gray, dinov2_features(model, batch[:, :1].expand(-1, 3, -1, -1)))


def test_dinov2_position_embedding_is_kept_at_the_pretrain_grid_and_resized_otherwise():
    model = randomised(DINOv2ViT(TINY_VIT))
    grid = TINY_VIT.pretrain_grid
    assert model.position_embedding(grid, grid) is model.pos_embed
    resized = model.position_embedding(16, 12)
    assert resized.shape == (1, 1 + 16 * 12, TINY_VIT.dim)
    torch.testing.assert_close(resized[:, :1], model.pos_embed[:, :1])
    with torch.no_grad():
        model.pos_embed.fill_(0.5)  # bicubic interpolation keeps a constant field constant
    torch.testing.assert_close(model.position_embedding(16, 12), torch.full_like(resized, 0.5))


def test_attention_matches_the_softmax_formula():
    torch.manual_seed(0)
    attention = Attention(dim=16, heads=2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)  # (B, T, D)
    q, k, v = attention.split_heads(x)  # (B, heads, T, 8)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, heads, T, T)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attention(x), expected)
    # and the head split itself is the fused projection cut into [q | k | v], each head a contiguous slice
    qkv = attention.qkv(x)
    torch.testing.assert_close(q[:, 1], qkv[..., 8:16])
    torch.testing.assert_close(v[:, 0], qkv[..., 32:40])


def test_dinov2_presets_have_the_official_key_layout():
    with torch.device("meta"):
        large = DINOv2ViT(PRESETS["ViT-L/14"]).state_dict()
        giant = DINOv2ViT(PRESETS["ViT-g/14"]).state_dict()
    assert sum(v.numel() for v in large.values()) == VIT_L_PARAMETERS
    assert large["cls_token"].shape == (1, 1, VIT_L_DIM)
    assert large["pos_embed"].shape == (1, VIT_L_POSITIONS, VIT_L_DIM)
    assert large["mask_token"].shape == (1, VIT_L_DIM)
    assert large["patch_embed.proj.weight"].shape == (VIT_L_DIM, 3, 14, 14)
    assert large["blocks.23.attn.qkv.weight"].shape == (3 * VIT_L_DIM, VIT_L_DIM)
    assert large["blocks.23.mlp.fc1.weight"].shape == (4 * VIT_L_DIM, VIT_L_DIM)
    assert large["blocks.0.ls1.gamma"].shape == large["blocks.0.ls2.gamma"].shape == (VIT_L_DIM,)
    assert "norm.weight" in large and "blocks.24.norm1.weight" not in large
    assert swiglu_hidden(1536) == 4096
    assert giant["blocks.39.mlp.w12.weight"].shape == (2 * 4096, 1536)
    assert giant["blocks.39.mlp.w3.weight"].shape == (1536, 4096)


def test_dinov2_swiglu_variant_loads_and_runs(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file(randomised(DINOv2ViT(TINY_SWIGLU_VIT)).state_dict(), str(path))
    features = dinov2_features(load_dinov2(path, preset=TINY_SWIGLU_VIT), images(1, size=(28, 28)))
    assert features.shape == (1, TINY_SWIGLU_VIT.dim)


def test_dinov2_missing_file_is_one_line_naming_file_and_option(tmp_path):
    with pytest.raises(UserError) as error:
        load_dinov2(tmp_path / "nope.pth")
    assert_one_line_naming(error, "nope.pth", "dinov2_vitl14_pretrain.pth", "--dinov2-weights")
    with pytest.raises(UserError) as error:
        load_dinov2(None, preset="ViT-S/14")
    assert_one_line_naming(error, "no weights file given", "dinov2_vits14_pretrain.pth", "--dinov2-weights")


def test_dinov2_wrong_key_and_unknown_preset(tiny_dinov2_file, tmp_path):
    state = torch.load(tiny_dinov2_file, weights_only=True)
    state["register_tokens"] = torch.zeros(1, 4, TINY_VIT.dim)
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "reg.pth")
    with pytest.raises(UserError) as error:
        load_dinov2(tmp_path / "reg.pth", preset=TINY_VIT)
    assert_one_line_naming(error, "missing: blocks.1.ls2.gamma", "unexpected: register_tokens", "--dinov2-weights")
    with pytest.raises(UserError) as error:
        load_dinov2(tiny_dinov2_file, preset="ViT-H/14")
    assert_one_line_naming(error, "ViT-H/14", "ViT-L/14")
