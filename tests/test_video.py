"""Video: (B, C, F, H, W) inputs on 3D token grids. One frame is the image model; space-time masks, 3D positions,
SparseDiT pooling and the FLOPs counter on video grids."""

import itertools

import pytest
import torch
from conftest import perturbed_model, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sprintdit.density import SparseConfig
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops
from sprintdit.masking import (
    check_mask_ratio,
    group_shape,
    lattice_layout,
    make_mask,
    restore_tokens,
    gather_tokens,
    structured_group,
)
from sprintdit.models import SiT, SparseDiT
from sprintdit.models.sit import (
    SprintConfig,
    axis_channels,
    patchify,
    resolve_model_config,
    sincos_table,
    unpatchify,
)

VIDEO = dict(input_size=[4, 16, 16], patch_size_t=2)  # a (2, 4, 4) token grid


def video_inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g, dtype=torch.float64)
    return (
        x,
        torch.rand(batch, generator=g, dtype=torch.float64),
        torch.randint(0, cfg.num_classes, (batch,), generator=g),
    )


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_one_frame_is_the_image_model(pos_embed):
    image = perturbed_model(pos_embed=pos_embed)
    video = perturbed_model(pos_embed=pos_embed, input_size=[1, 16, 16])
    assert video.config.grid == (1, 4, 4)
    for (name, a), (other, b) in zip(image.state_dict().items(), video.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name
    x, t, y = video_inputs(image, batch=4)
    masks = [make_mask(4, m.config.grid, 0.75, "structured", torch.Generator().manual_seed(5)) for m in (image, video)]
    assert torch.equal(masks[0].dropped, masks[1].dropped)  # the one-frame draw is the image draw
    out_image, out_video = image(x, t, y, mask=masks[0]), video(x[:, :, None], t, y, mask=masks[1])
    assert out_video.shape == (4, 2, 1, 16, 16)
    torch.testing.assert_close(out_video[:, :, 0], out_image, rtol=0, atol=0)


def test_one_frame_sparsedit_is_the_image_sparsedit():
    layout = SparseConfig(grid="2:4", pool_depth=1, modules=2, sparse_depth=1, dense_depth=0)
    models = []
    for size in ([16, 16], [1, 16, 16]):
        torch.manual_seed(0)
        models.append(
            SparseDiT(
                tiny_config(
                    arch="sparsedit",
                    input_size=size,
                    depth=7,
                    sparse=layout,
                    sprint=SprintConfig(fusion="none", path_drop_prob=0.0),
                )
            )
            .double()
            .eval()
        )
    with torch.no_grad():
        for a, b in zip(*(m.parameters() for m in models)):
            a.copy_(torch.randn_like(a) * 0.2)
            b.copy_(a)
    x, t, y = video_inputs(models[0], batch=4)
    torch.testing.assert_close(models[1](x[:, :, None], t, y)[:, :, 0], models[0](x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_a_shorter_clip_runs_as_the_model_of_its_length(pos_embed):
    """A training stage's `frames`: the 4-token-frame model given a 2-token-frame clip (its positions' first rows,
    the output grid from the tokens) computes exactly what the model built for 2-token-frame clips does."""
    long = perturbed_model(pos_embed=pos_embed, input_size=[8, 16, 16], patch_size_t=2)  # (4, 4, 4) tokens
    short = perturbed_model(pos_embed=pos_embed, input_size=[4, 16, 16], patch_size_t=2)  # (2, 4, 4)
    short.load_state_dict(long.state_dict())
    assert long.config.at_frames(4) == short.config and long.config.token_grid(32) == (2, 4, 4)
    x, t, y = video_inputs(short, batch=3)
    mask = make_mask(3, short.config.grid, 0.75, "structured", torch.Generator().manual_seed(1))
    path_drop = torch.tensor([False, True, False])
    torch.testing.assert_close(
        long(x, t, y, mask=mask, path_drop=path_drop), short(x, t, y, mask=mask, path_drop=path_drop), rtol=0, atol=0
    )
    torch.testing.assert_close(long(x, t, y, middle_rows=1), short(x, t, y, middle_rows=1), rtol=0, atol=0)


def test_patchify_3d_matches_conv3d_and_round_trips():
    x = torch.randn(2, 3, 4, 8, 12)
    conv = torch.nn.Conv3d(3, 5, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    tokens = patchify(x, (2, 4, 4))  # (2, 2*2*3, 3*2*4*4)
    reference = conv(x).flatten(2).transpose(1, 2)  # (B, N, 5), tokens in (frame, row, col) order
    torch.testing.assert_close(tokens @ conv.weight.reshape(5, -1).T + conv.bias, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(unpatchify(tokens, (2, 4, 4), (2, 2, 3)), x)


def test_axis_channels_split():
    assert axis_channels(32, (8, 4, 4)) == (8, 12, 12)
    assert axis_channels(72, (8, 16, 16)) == (20, 26, 26)  # SiT-XL's head dim: whole pairs for every axis
    assert axis_channels(32, (1, 4, 4)) == (0, 16, 16) and axis_channels(32, (4, 4)) == (16, 16)


def reference_rope_3d(positions, head_dim, theta=10000.0):
    """3D RoPE written per token from its (frame, row, col) and the split (time, rows, cols) channels."""
    channels = axis_channels(head_dim, (2, 2, 2))
    freqs = [[theta ** (-j / m) for j in range(0, m, 2) for _ in range(2)] for m in channels]
    angles = torch.tensor([[p * f for p, fs in zip(pos, freqs) for f in fs] for pos in positions], dtype=torch.float64)
    return angles.cos(), angles.sin()


def test_3d_rope_at_kept_tokens_is_the_row_of_their_true_position():
    model = perturbed_model(**VIDEO)
    (ft, h, w), head_dim = model.config.grid, model.config.hidden_size // model.config.num_heads
    cos, sin = reference_rope_3d(list(itertools.product(range(ft), range(h), range(w))), head_dim)
    torch.testing.assert_close(model.rope_cos.double(), cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.rope_sin.double(), sin, atol=1e-6, rtol=0)
    x, t, y = video_inputs(model, batch=2)
    mask = make_mask(2, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    c = model.t_embedder(t) + model.y_embedder(y)
    hidden = model.run_blocks(model.encoder, model.x_embedder(x), c, model.rope)
    sparse = model.sparse_path(hidden, c, model.rope, mask, rows=2)
    for i in range(2):
        ids = mask.ids_keep[i]
        kc, ks = reference_rope_3d([(int(n) // (h * w), int(n) // w % h, int(n) % w) for n in ids], head_dim)
        ref = hidden[i : i + 1, ids]
        for block in model.middle:
            ref = block(ref, c[i : i + 1], (kc.float().double(), ks.float().double()))
        torch.testing.assert_close(sparse[i, ids], ref[0], rtol=0, atol=1e-9)


def test_3d_sincos_blocks_are_columns_rows_frames():
    table = sincos_table((2, 3, 4), 32)  # channels: 12 columns, 12 rows, 8 frames
    n = torch.arange(24)
    frame, row, col = n // 12, n // 4 % 3, n % 4
    for block, pos, width in ((slice(0, 12), col, 12), (slice(12, 24), row, 12), (slice(24, 32), frame, 8)):
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
        angles = pos[:, None].double() * omega
        torch.testing.assert_close(
            table[:, block].double(), torch.cat([angles.sin(), angles.cos()], 1), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("grid", [(4, 4, 4), (8, 4, 4), (2, 6, 6), (3, 4, 8)])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_space_time_masks_keep_k_in_every_group_and_restore(grid, ratio):
    g, k = structured_group(ratio, grid)
    group = group_shape(g, grid)
    mask = make_mask(6, grid, ratio, "structured", torch.Generator().manual_seed(1))
    assert mask.num_kept == k * (grid[0] * grid[1] * grid[2]) // (group[0] * g * g)
    for dropped in mask.dropped.view(6, *grid):
        kept = (~dropped).int()
        counts = lambda o: (
            torch.roll(kept, tuple(-v for v in o), (0, 1, 2))
            .view(grid[0] // group[0], group[0], grid[1] // g, g, grid[2] // g, g)
            .sum((1, 3, 5))
        )
        assert any(bool((counts(o) == k).all()) for o in itertools.product(*(range(s) for s in group)))
    x = torch.randn(6, mask.dropped.shape[1], 3)
    restored = restore_tokens(gather_tokens(x, mask.ids_keep), mask, torch.zeros(3))
    assert torch.equal(restored[~mask.dropped], x[~mask.dropped]) and torch.equal(
        restored[mask.dropped], torch.zeros(int(mask.dropped.sum()), 3)
    )


def test_space_time_groups_follow_the_frames():
    assert (
        group_shape(2, (8, 4, 4)) == (2, 2, 2)
        and group_shape(4, (2, 8, 8)) == (2, 4, 4)
        and group_shape(2, (3, 4, 4)) == (1, 2, 2)
    )
    assert structured_group(0.75, (8, 4, 4)) == (2, 2)  # 2 of every 2x2x2 block


def test_structured_3d_lattice_at_an_offset_matches_a_hand_layout():
    """Grid (2, 2, 4), groups 2x2x2 (two of them, along the columns), one token kept per group."""
    group_dropped = torch.ones(1, 1, 1, 2, 8, dtype=torch.bool)
    group_dropped[0, 0, 0, 0, 0] = False  # group 0 keeps its (0, 0, 0)
    group_dropped[0, 0, 0, 1, 7] = False  # group 1 keeps its (1, 1, 1)
    dropped = lattice_layout(group_dropped, (2, 2, 2), torch.tensor([[1, 0, 1]])).view(2, 2, 4)
    kept = sorted(tuple(v) for v in (~dropped).nonzero().tolist())
    # shifted by one frame and one column: (0,0,0) -> (1,0,1); group 1's (1,1,3) -> (0,1,0) (wrapping both)
    assert kept == [(0, 1, 0), (1, 0, 1)]


def test_unachievable_space_time_ratio_lists_the_achievable():
    with pytest.raises(
        UserError,
        match=r"not achievable on a 8x4x4 token grid; achievable with groups up to 4x4 \(x up to 4 frames\): .*0\.75",
    ):
        check_mask_ratio(0.3, "structured", (8, 4, 4))


def counted(model, *args, **kwargs) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def test_video_flops_match_torch_counter():
    model = SiT(tiny_config(**VIDEO))
    cfg, b = model.config, 2
    x, t, y = (v.float() if v.is_floating_point() else v for v in video_inputs(model, batch=b))
    assert counted(model, x, t, y) == forward_flops(cfg, b)
    for ratio in (0.5, 0.75):
        mask = make_mask(b, cfg.grid, ratio, "structured", torch.Generator().manual_seed(0))
        assert counted(model, x, t, y, mask=mask) == forward_flops(cfg, b, ratio)
    assert counted(model, x, t, y, middle_rows=1) == forward_flops(cfg, b, middle_rows=1)
    short = cfg.at_frames(2)  # a shorter-clip stage's forward: one token frame of the two
    mask = make_mask(b, short.grid, 0.5, "structured", torch.Generator().manual_seed(0))
    assert counted(model, x[:, :, :2], t, y, mask=mask) == forward_flops(short, b, 0.5) < forward_flops(cfg, b, 0.5)


@pytest.mark.parametrize("frames", [None, 1])
def test_video_sparsedit_flops_match_torch_counter_and_pool_time(frames):
    layout = SparseConfig(grid="2", pool_depth=1, modules=1, sparse_depth=1, dense_depth=1, frames=frames)
    model = SparseDiT(
        tiny_config(
            arch="sparsedit", depth=6, sparse=layout, sprint=SprintConfig(fusion="none", path_drop_prob=0.0), **VIDEO
        )
    ).eval()
    x, t, y = (v.float() if v.is_floating_point() else v for v in video_inputs(model, batch=2))
    assert model(x, t, y).shape == x.shape
    assert counted(model, x, t, y, side=2) == forward_flops(model.config, 2, side=2)


@pytest.mark.parametrize(
    "bad",
    [
        dict(input_size=[4, 16], patch_size_t=2),
        dict(input_size=[3, 16, 16], patch_size_t=2),
        dict(input_size=[2, 3, 16, 16]),
        dict(input_size=[4, 16, 16], hidden_size=8, num_heads=2),
    ],
)
def test_bad_video_configs_rejected(bad):
    with pytest.raises(UserError):
        resolve_model_config(tiny_config(**bad))


def test_sparsify_a_dense_video_model():
    from sprintdit.models.sparsedit import sparsify_state_dict

    torch.manual_seed(0)
    dense = SiT(tiny_config(sprint=SprintConfig(fusion="none", path_drop_prob=0.0), **VIDEO)).eval()
    layout = SparseConfig(grid="2:4", pool_depth=1, modules=1, sparse_depth=2, dense_depth=1, frames=1)
    sparse = SparseDiT(replace_config(dense.config, arch="sparsedit", sparse=layout)).eval()
    sparse.load_state_dict(sparsify_state_dict(dense.state_dict(), sparse.config))
    x, t, y = (v.float() if v.is_floating_point() else v for v in video_inputs(dense, batch=2))
    assert sparse(x, t, y).shape == dense(x, t, y).shape == x.shape


def replace_config(cfg, **changes):
    from dataclasses import replace

    return resolve_model_config(replace(cfg, **changes))


@pytest.mark.parametrize("shape", [(4, 3, 3), (2, 3, 3)])  # time kept (each frame pooled as an image), time pooled too
def test_video_token_pooling_is_the_3d_adaptive_average(shape):
    from sprintdit.models.sparsedit import pool_tokens

    grid = (4, 6, 6)
    h = torch.randn(2, 4 * 6 * 6, 5, dtype=torch.float64)  # (B, F H W, D)
    expected = (
        torch.nn.functional.adaptive_avg_pool3d(h.transpose(1, 2).unflatten(2, grid), shape).flatten(2).transpose(1, 2)
    )
    torch.testing.assert_close(pool_tokens(h, grid, shape), expected)


def test_sampling_starts_from_the_objectives_correlated_frame_noise():
    from sprintdit.objective import FlowMatching, ObjectiveConfig
    from sprintdit.sampling import SampleConfig, generate

    model = perturbed_model(**VIDEO, dtype=torch.float32)
    model.register_forward_hook(lambda module, inputs, out: out * 0)  # zero velocity: Euler returns its starting noise
    seeds, labels = list(range(200)), [0] * 200
    cfg = SampleConfig(guidance="none", steps=1, batch_size=64)
    plain = generate(model, FlowMatching(ObjectiveConfig(), model.null_class), labels, seeds, cfg, "cpu")
    mixed = generate(
        model, FlowMatching(ObjectiveConfig(frame_noise_corr=0.6), model.null_class), labels, seeds, cfg, "cpu"
    )
    first, second = plain[:, :, 0].flatten(), plain[:, :, 3].flatten()
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.05
    first, second = mixed[:, :, 0].flatten(), mixed[:, :, 3].flatten()
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1] - 0.6) < 0.05
    assert abs(mixed.std() - 1.0) < 0.03
