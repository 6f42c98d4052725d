import math

import pytest
import torch
from conftest import DENSE, perturbed_model, tiny_config, tiny_inputs

from sprintdit.errors import UserError
from sprintdit.masking import make_mask, random_mask
from sprintdit.models import PRESETS, ModelConfig, SiT, resolve_model_config
from sprintdit.models.sit import SprintConfig, patchify, unpatchify


def test_mask_ratio_zero_equals_dense():
    model = perturbed_model()
    x, t, y = tiny_inputs(model)
    # a ratio-0 random mask keeps every token, in a shuffled order
    mask = random_mask(3, model.config.grid, 0.0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    mask = type(mask)(shuffled, torch.argsort(shuffled, dim=1), mask.dropped)
    torch.testing.assert_close(model(x, t, y, mask=mask), model(x, t, y), rtol=0, atol=1e-12)


def plain_sit_forward(model, x, t, y):
    """A dense SiT written out without the SPRINT split: every block in turn."""
    h = model.x_embedder(x)
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        h = block(h, c, (model.rope_cos, model.rope_sin))
    return unpatchify(model.final_layer(h, c), model.config.patch_size, model.config.grid)


@pytest.mark.parametrize("split", [(2, 2), (0, 0), (1, 4)])
def test_fusion_none_without_mask_is_a_dense_sit(split):
    model = perturbed_model(
        sprint=SprintConfig(fusion="none", path_drop_prob=0.0, encoder_depth=split[0], decoder_depth=split[1])
    )
    x, t, y = tiny_inputs(model)
    torch.testing.assert_close(model(x, t, y), plain_sit_forward(model, x, t, y), rtol=0, atol=1e-12)
    assert "fusion.weight" not in model.state_dict()


def reference_rope(rows, cols, head_dim, theta=10000.0):
    """The spec's 2D RoPE, written per token from its (row, col)."""
    m = head_dim // 2
    freqs = [theta ** (-j / m) for j in range(0, m, 2) for _ in range(2)]
    angles = torch.tensor(
        [[r * f for f in freqs] + [c * f for f in freqs] for r, c in zip(rows, cols)], dtype=torch.float64
    )
    return angles.cos(), angles.sin()


def test_sparse_path_sees_rope_angles_of_kept_positions():
    model = perturbed_model()
    x, t, y = tiny_inputs(model, batch=2)
    mask = make_mask(2, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.run_blocks(model.encoder, model.x_embedder(x), c, (model.rope_cos, model.rope_sin))
    sparse = model.sparse_path(h, c, model.rope, mask, rows=2)  # (2, N, D)
    w = model.config.grid[1]
    head_dim = model.config.hidden_size // model.config.num_heads
    for i in range(2):
        ids = mask.ids_keep[i]
        cos, sin = reference_rope((ids // w).tolist(), (ids % w).tolist(), head_dim)
        ref = h[i : i + 1, ids]
        for block in model.middle:
            ref = block(ref, c[i : i + 1], (cos.float().double(), sin.float().double()))  # tables are stored in fp32
        torch.testing.assert_close(sparse[i, ids], ref[0], rtol=0, atol=1e-9)
        torch.testing.assert_close(
            sparse[i, mask.dropped[i]], model.mask_token[0].expand(int(mask.dropped[i].sum()), -1)
        )


def test_rope_tables_match_reference():
    model = perturbed_model()
    ids = torch.arange(16)
    cos, sin = reference_rope((ids // 4).tolist(), (ids % 4).tolist(), 16)
    torch.testing.assert_close(model.rope_cos.double(), cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.rope_sin.double(), sin, atol=1e-6, rtol=0)


def test_pdg_forward_equals_manual_composition():
    model = perturbed_model()
    x, t, _ = tiny_inputs(model, batch=2)
    y = torch.tensor([1, 3])
    null = torch.full_like(y, model.null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), middle_rows=2)
    # conditional half: the ordinary forward
    torch.testing.assert_close(out[:2], model(x, t, y), rtol=0, atol=1e-12)
    # unconditional half: encoder -> fuse(MASK everywhere, dense) -> decoder, null label, middle skipped
    c = model.t_embedder(t) + model.y_embedder(null)
    rope = (model.rope_cos, model.rope_sin)
    h = model.run_blocks(model.encoder, model.x_embedder(x), c, rope)
    z = model.fusion(torch.cat([model.mask_token.expand_as(h), h], dim=-1))
    h = model.run_blocks(model.decoder, z, c, rope)
    manual = unpatchify(model.final_layer(h, c), model.config.patch_size, model.config.grid)
    torch.testing.assert_close(out[2:], manual, rtol=0, atol=1e-12)


def test_path_drop_matches_skipping_middle():
    model = perturbed_model()
    x, t, y = tiny_inputs(model)
    drop = torch.tensor([True, False, True])
    out = model(x, t, y, path_drop=drop)
    torch.testing.assert_close(out[drop], model(x[drop], t[drop], y[drop], middle_rows=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[~drop], model(x[~drop], t[~drop], y[~drop]), rtol=0, atol=1e-12)


def test_fusion_init_and_fixed_mask_token():
    torch.manual_seed(0)
    model = SiT(tiny_config())
    d = model.config.hidden_size
    bound = math.sqrt(6 / (3 * d))  # xavier-uniform bound for a (D, 2D) weight
    w = model.fusion.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound and w.std() > 0.3 * bound
    assert torch.equal(model.fusion.bias, torch.zeros(d))
    assert "mask_token" in model.state_dict()
    assert all(p is not model.mask_token for p in model.parameters())
    assert 0.01 < model.mask_token.std() < 0.04
    # adaLN-Zero: every block starts as the identity, so the output starts at zero
    x, t, y = tiny_inputs(model)
    assert torch.equal(model(x.float(), t.float(), y), torch.zeros(3, 2, 16, 16))


def test_patchify_matches_conv_patch_embedding():
    x = torch.randn(2, 3, 8, 12)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    linear_out = patchify(x, 4) @ conv.weight.reshape(5, -1).T + conv.bias
    conv_out = conv(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major tokens
    torch.testing.assert_close(linear_out, conv_out)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (2, 3)), x)


@pytest.mark.parametrize(
    "options",
    [
        dict(pos_embed="sincos"),
        dict(mlp="swiglu"),
        dict(qk_norm=False),
        dict(learn_sigma=True),
        dict(input_size=[8, 16]),
        dict(patch_size=2),
    ],
)
def test_options_build_and_run(options):
    model = perturbed_model(**options)
    x, t, y = tiny_inputs(model)
    mask = make_mask(3, model.config.grid, 0.5, "random", torch.Generator().manual_seed(0))
    out = model(x, t, y, mask=mask)
    assert out.shape == (3, model.config.out_channels, *model.config.input_size)
    assert torch.isfinite(out).all()


def test_published_preset_sizes():
    assert PRESETS["SiT-XL/2"] == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    assert PRESETS["SiT-B/4"] == dict(hidden_size=768, depth=12, num_heads=12, patch_size=4)
    cfg = ModelConfig(
        preset="SiT-XL/2",
        input_size=[32, 32],
        in_channels=4,
        num_classes=1000,
        learn_sigma=True,
        qk_norm=False,
        pos_embed="sincos",
        sprint=DENSE,
    )
    with torch.device("meta"):
        dense = SiT(cfg)
        sprint = SiT(
            resolve_model_config(
                ModelConfig(**{**vars(cfg), "sprint": SprintConfig(fusion="concat_linear", path_drop_prob=0.1)})
            )
        )
    n_dense = sum(p.numel() for p in dense.parameters())
    n_sprint = sum(p.numel() for p in sprint.parameters())
    assert abs(n_dense / 675e6 - 1) < 0.005  # DiT-XL/2: 675M parameters
    assert 0.003 < n_sprint / n_dense - 1 < 0.004  # the fusion adds 0.3-0.4%
    assert sprint.config.middle_depth == 24


@pytest.mark.parametrize(
    "bad",
    [
        dict(preset="SiT-XXL/2"),
        dict(sprint=SprintConfig(fusion="sum")),
        dict(sprint=SprintConfig(encoder_depth=4, decoder_depth=3)),
        dict(input_size=[15, 16]),
        dict(num_heads=3),
        dict(sprint=SprintConfig(fusion="none", path_drop_prob=0.1)),
        dict(hidden_size=None, preset=None),
    ],
)
def test_bad_model_configs_rejected(bad):
    with pytest.raises(UserError):
        resolve_model_config(tiny_config(**bad))


def test_grad_checkpointing_gives_same_gradients():
    model = perturbed_model()
    x, t, y = tiny_inputs(model)
    mask = make_mask(3, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, y, mask=mask).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_qk_norm_under_bf16_autocast_stays_on_the_fused_kernel(monkeypatch):
    """The head norm hands torch's rms_norm a weight of the input's dtype (a float32 weight with bf16 q, k sends torch
    to its unfused fallback, with a one-time "Mismatch dtype" warning); in float32 it is torch's RMSNorm exactly."""
    import torch.nn.functional as F

    from sprintdit.models.sit import HeadNorm

    norm, plain = HeadNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        plain.weight.copy_(norm.weight)
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(norm(x), plain(x))
    seen, rms_norm = [], F.rms_norm
    monkeypatch.setattr(
        F,
        "rms_norm",
        lambda x, shape, weight, eps: seen.append((x.dtype, weight.dtype)) or rms_norm(x, shape, weight, eps),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(torch.nn.functional.linear(x, torch.eye(16)))  # bf16 under autocast, as q and k are
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.bfloat16
