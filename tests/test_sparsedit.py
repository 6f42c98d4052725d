import pytest
import torch
from conftest import DENSE, tiny_config
from test_flops import counted

from sprintdit.density import (
    SparseConfig,
    gate_at,
    parse_schedule,
    pooled_centres,
    side_at,
    side_intervals,
    sides_for,
    time_gates,
)
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops
from sprintdit.models import SiT, SparseDiT, resolve_model_config
from sprintdit.models.sit import SprintConfig, TextConfig, modulate
from sprintdit.models.sparsedit import PoolingAttention, Recover, pool_tokens, sparsify_state_dict, upsample_tokens
from sprintdit.objective import FlowMatching, ObjectiveConfig

LAYOUT = SparseConfig(grid="2:4", pool_depth=1, modules=2, sparse_depth=1, dense_depth=0)  # 1 + 2 x 3 blocks, 1 top


# caption embeddings (B, 5, 8)
TEXT = dict(condition="text", num_classes=None, text=TextConfig(encoder="t5", dim=8, max_tokens=5, pooled=True))


def dense_and_sparse(pos_embed="rope", grid="2:4", seed=0, recover="fuse", condition="class"):
    """A dense model with every weight random and the SparseDiT sparsified from it (float64)."""
    torch.manual_seed(seed)
    cfg = tiny_config(
        input_size=[32, 32], depth=8, sprint=DENSE, pos_embed=pos_embed, **(TEXT if condition == "text" else {})
    )  # 8 x 8 tokens
    dense = SiT(cfg).double().eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        if condition == "text":
            dense.y_embedder.empty.copy_(torch.randn(5, 8) * (torch.arange(5) < 2)[:, None])  # the empty text: 2 tokens
    sparse_cfg = resolve_model_config(
        tiny_config(
            **{
                **vars(dense.config),
                "arch": "sparsedit",
                "sparse": SparseConfig(**{**vars(LAYOUT), "grid": grid, "recover": recover}),
            }
        )
    )
    sparse = SparseDiT(sparse_cfg).double().eval()
    sparse.load_state_dict(sparsify_state_dict(dense.state_dict(), sparse_cfg))
    return dense, sparse


def inputs(model, batch=3, seed=1):
    """x, t and labels (the null label among them), or captions of 1 to 5 tokens (the all-zero empty text among
    them)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    if cfg.condition == "class":
        return x, t, torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    lengths = torch.arange(batch) % (cfg.text.max_tokens + 1)  # 0: the unconditional caption
    keep = torch.arange(cfg.text.max_tokens)[None] < lengths[:, None]  # (B, L)
    return (
        x,
        t,
        torch.randn(batch, cfg.text.max_tokens, cfg.text.dim, generator=g, dtype=torch.float64) * keep[..., None],
    )


def test_poolingformer_equals_uniform_attention():
    torch.manual_seed(0)
    attn = PoolingAttention(8).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    uniform = torch.full((5, 5), 1 / 5, dtype=torch.float64)  # every token attends equally to every token
    expected = attn.proj(uniform @ attn.v(x))  # (2, 5, 8)
    torch.testing.assert_close(attn(x).expand_as(expected), expected)


def test_recover_fusion_starts_as_identity_on_the_dense_path():
    recover = Recover(6, "fuse")
    recover.reset()
    up, dense = torch.randn(2, 9, 6), torch.randn(2, 9, 6)
    torch.testing.assert_close(recover(up, dense), dense, rtol=0, atol=0)
    recover = Recover(6, "residual")
    recover.reset()
    torch.testing.assert_close(recover(up, dense), up + dense, rtol=0, atol=0)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_residual_recover_at_the_full_grid_starts_as_the_dense_model(pos_embed):
    """recover residual: m = h + up(s - pooled). At sparse grid = dense grid pooling is the identity, so m = s and every
    cross-attention is self-attention: straight after sparsify the SparseDiT is the dense model with Poolingformers
    below."""
    dense, sparse = dense_and_sparse(pos_embed, grid="8", recover="residual")
    x, t, y = inputs(dense)
    h, c, _ = dense.embed(x, t, y)
    h = sparse.blocks[0](h, c, None)
    expected = dense.head(dense.run_blocks(dense.blocks[1:], h, c, dense.rope), c)
    torch.testing.assert_close(sparse(x, t, y), expected)
    _, fused = dense_and_sparse(pos_embed, grid="8")
    assert not torch.allclose(fused(x, t, y), expected)  # the paper's init drops the sparse blocks' work at first


def test_sparsify_maps_every_block_to_the_same_depth():
    dense, sparse = dense_and_sparse()
    d, ds, ss = dense.config.hidden_size, dense.state_dict(), sparse.state_dict()
    assert torch.equal(ss["blocks.0.attn.v.weight"], ds["blocks.0.attn.qkv.weight"][2 * d :])  # block 0: Poolingformer
    assert "blocks.0.attn.q_norm.weight" not in ss
    for key in (
        "blocks.1.attn.qkv.weight",
        "blocks.4.mlp.fc1.bias",
        "blocks.7.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
    ):
        assert torch.equal(ss[key], ds[key])
    assert SparseDiT.block_kinds(sparse.config) == [
        "pool",
        "merge",
        "sparse",
        "recover",
        "merge",
        "sparse",
        "recover",
        "top",
    ]


@pytest.mark.parametrize("pos_embed,condition", [("rope", "class"), ("sincos", "class"), ("rope", "text")])
def test_full_grid_with_w1_identity_equals_the_plain_blocks(pos_embed, condition):
    """At sparse grid = dense grid, pooling and upsampling are identities; with W1 = I, W2 = 0 the merge and
    recover cross-attentions become self-attention, so SparseDiT is the dense model with Poolingformers below.
    A text model's blocks keep their cross-attention to the caption."""
    dense, sparse = dense_and_sparse(pos_embed, grid="8", condition=condition)
    with torch.no_grad():
        for recover in sparse.recovers:
            recover.w1.weight.copy_(torch.eye(recover.w1.weight.shape[0]))
            recover.w2.weight.zero_()
    x, t, y = inputs(dense, batch=6)
    h, c, text = dense.embed(x, t, y)
    h = sparse.blocks[0](h, c, None, text=text)
    expected = dense.head(dense.run_blocks(dense.blocks[1:], h, c, dense.rope, text=text), c)
    torch.testing.assert_close(sparse(x, t, y), expected)


@pytest.mark.parametrize("condition", ["class", "text"])
def test_mixed_noise_levels_in_a_batch_equal_one_sample_at_a_time(condition):
    _, sparse = dense_and_sparse(condition=condition)
    x, _, y = inputs(sparse, batch=4)
    t = torch.tensor([0.05, 0.5, 0.95, 0.3], dtype=torch.float64)
    assert len(set(sparse.sides(t))) == 3
    together = sparse(x, t, y)
    for i in range(4):
        torch.testing.assert_close(together[i : i + 1], sparse(x[i : i + 1], t[i : i + 1], y[i : i + 1]))
    assert not torch.allclose(sparse(x, t, y, side=2), sparse(x, t, y, side=4))


def test_another_grid_at_sampling_time_equals_a_model_built_with_it():
    _, sparse = dense_and_sparse(grid="2:4", recover="residual")  # (fuse starts with the sparse path weighted 0)
    # the same weights (same seed), built with the other schedule
    _, built = dense_and_sparse(grid="1=3,0.5=2", recover="residual")
    x, _, y = inputs(sparse, batch=4)
    t = torch.tensor([0.05, 0.4, 0.8, 0.95], dtype=torch.float64)
    before = sparse(x, t, y)
    sparse.use_grid("1=3,0.5=2")
    assert sparse.sides(t) == [2, 2, 3, 3] and sparse.config.sparse.grid == "1=3,0.5=2"
    torch.testing.assert_close(sparse(x, t, y), built(x, t, y))
    assert not torch.allclose(before, sparse(x, t, y))
    with pytest.raises(UserError, match="exceeds the 8x8 token grid"):
        sparse.use_grid("9")


def test_pooling_and_upsampling_of_the_token_grid():
    h = torch.arange(16.0).reshape(1, 16, 1)  # 4 x 4 grid, value = raster index
    pooled = pool_tokens(h, (4, 4), (2, 2))
    torch.testing.assert_close(pooled.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    up = upsample_tokens(pooled, (2, 2), (4, 4)).reshape(4, 4)
    assert torch.equal(up[:2, :2], torch.full((2, 2), 2.5)) and torch.equal(up[2:, 2:], torch.full((2, 2), 12.5))
    torch.testing.assert_close(pooled_centres(2, 4), torch.tensor([0.5, 2.5], dtype=torch.float64))
    torch.testing.assert_close(pooled_centres(4, 4), torch.arange(4.0, dtype=torch.float64))


def test_paper_schedule_values():
    """6:10 on a 16 x 16 grid (the paper's 256px r in [0.61, 0.86])."""
    s, n = parse_schedule("6:10"), 256
    assert side_at(s, 1.0, n) == 6  # pure noise: the most pruning
    assert [side_at(s, t, n) for t in (0.0, 0.1, 0.25)] == [10, 10, 10]  # the last quarter of sampling is densest
    # halfway through [1/4, 1]: r = (r_min + r_max) / 2 keeps (100 + 36) / 2 = 68 tokens -> the 8 x 8 grid (64)
    assert side_at(s, 0.625, n) == 8
    sides = [side_at(s, t / 100, n) for t in range(101)]
    assert sides == sorted(sides, reverse=True)  # fewer tokens as noise grows
    assert {side_at(parse_schedule("8"), t, n) for t in (0.0, 0.5, 1.0)} == {8}
    knots = parse_schedule("1=6,0.5=8,0.2=10")
    assert [side_at(knots, t, n) for t in (1.0, 0.5, 0.2, 0.0)] == [6, 8, 10, 10]


@pytest.mark.parametrize("text", ["6-10", "0:4", "1=6,1=8", "2=4", "a"])
def test_bad_schedules_are_one_line_errors(text):
    with pytest.raises(UserError):
        parse_schedule(text)


def test_layout_and_grid_are_checked():
    base = tiny_config(input_size=[32, 32], depth=8, sprint=DENSE, arch="sparsedit")
    with pytest.raises(UserError, match="exceed depth"):
        resolve_model_config(
            tiny_config(
                **{**vars(base), "sparse": SparseConfig(modules=3, pool_depth=1, sparse_depth=1, dense_depth=0)}
            )
        )
    with pytest.raises(UserError, match="exceeds"):
        resolve_model_config(tiny_config(**{**vars(base), "sparse": SparseConfig(**{**vars(LAYOUT), "grid": "4:9"})}))
    with pytest.raises(UserError, match="fusion"):
        resolve_model_config(tiny_config(**{**vars(base), "sprint": SprintConfig(), "sparse": LAYOUT}))


@pytest.mark.parametrize("side,condition", [(2, "class"), (3, "class"), (4, "class"), (8, "class"), (3, "text")])
def test_flops_at_each_grid_match_torch_counter(side, condition):
    _, sparse = dense_and_sparse(condition=condition)
    x, t, y = inputs(sparse, batch=2)
    assert counted(sparse, x, t, y, side=side) == forward_flops(sparse.config, 2, side=side)
    dense_flops = forward_flops(resolve_model_config(tiny_config(input_size=[32, 32], depth=8, sprint=DENSE)), 2)
    # even at the full grid: the Poolingformer has no N x N attention
    assert forward_flops(sparse.config, 2, side=side) < dense_flops


def test_merge_block_cross_attention_by_hand():
    """Merge block: queries from the sparse tokens, keys and values from the dense context, both normed and
    modulated alike, q from the q rows of qkv and k, v from the k, v rows; then the MLP."""
    _, sparse = dense_and_sparse()
    block, d = sparse.blocks[1], sparse.config.hidden_size
    g = torch.Generator().manual_seed(3)
    tokens, context, c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 4, d), (1, 64, d), (1, d)))
    shift, scale, gate, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=-1)
    a, b = modulate(block.norm1(tokens), shift, scale), modulate(block.norm1(context), shift, scale)
    heads, w, bias = block.attn.heads, block.attn.qkv.weight, block.attn.qkv.bias
    q = block.attn.q_norm((a @ w[:d].T + bias[:d]).view(1, 4, heads, -1).transpose(1, 2))
    k = block.attn.k_norm((b @ w[d : 2 * d].T + bias[d : 2 * d]).view(1, 64, heads, -1).transpose(1, 2))
    v = (b @ w[2 * d :].T + bias[2 * d :]).view(1, 64, heads, -1).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v  # (1, heads, 4, dh)
    x = tokens + gate.unsqueeze(1) * block.attn.proj(attn.transpose(1, 2).reshape(1, 4, d))
    expected = x + gate_m.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_m, scale_m))
    torch.testing.assert_close(block(tokens, c, None, context=context), expected)


def test_readd_pos_adds_the_cell_centre_positions():
    """With positions re-added and the full grid, pooled tokens get the dense table once more: the model changes,
    and the sparse positions at side == grid are exactly the dense table."""
    dense, plain = dense_and_sparse("sincos", grid="8")
    readd_cfg = resolve_model_config(
        tiny_config(
            **{**vars(plain.config), "sparse": SparseConfig(**{**vars(plain.config.sparse), "readd_pos": True})}
        )
    )
    readd = SparseDiT(readd_cfg).double().eval()
    readd.load_state_dict(plain.state_dict())
    x, t, y = inputs(dense)
    torch.testing.assert_close(readd.sparse_pos(8, x), readd.pos_embed.double())
    assert not torch.allclose(readd(x, t, y), plain(x, t, y))
    with pytest.raises(UserError, match="readd_pos"):
        resolve_model_config(tiny_config(**{**vars(readd_cfg), "pos_embed": "rope"}))


def test_side_intervals_cut_t_where_the_grid_changes():
    intervals = side_intervals(parse_schedule("6:10"), 256)  # 16 x 16 tokens
    assert (
        intervals[0][0] == 0.0
        and intervals[-1][1] == 1.0
        and all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
    )
    assert [side for *_, side in intervals] == [10, 9, 8, 7, 6]
    # kept tokens fall linearly from 100 (t = 1/4) to 36 (t = 1): 10 gives way to 9 where 90.5 are kept
    assert intervals[0][1] == pytest.approx(0.25 + 0.75 * (100 - 90.5) / 64)
    for lo, hi, side in intervals:
        assert all(side_at(parse_schedule("6:10"), lo + (hi - lo) * f, 256) == side for f in (0.01, 0.5, 0.99))
    assert side_intervals(parse_schedule("8"), 256) == [(0.0, 1.0, 8)]


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_gated_draws_keep_the_distribution_of_t_with_one_grid_per_micro_batch(time_sampling):
    objective = FlowMatching(ObjectiveConfig(time_sampling=time_sampling), null_class=10)
    gates = time_gates("6:10", 256, objective.time_cdf)  # 16 x 16 tokens
    assert [g.side for g in gates] == [10, 9, 8, 7, 6] and sum(g.hi - g.lo for g in gates) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    drawn = []
    for n in range(1500):
        gate = gate_at(gates, n)
        t = objective.sample_t(16, g, (gate.lo, gate.hi))
        assert set(sides_for(parse_schedule("6:10"), t, 256)) == {gate.side}  # one grid for the whole micro-batch
        drawn.append(t)
    t = torch.cat(drawn).double()
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):  # the empirical CDF of all draws is the ungated one (24000 draws: std ~0.003)
        assert (t <= q).double().mean().item() == pytest.approx(objective.time_cdf(q), abs=0.012)


def test_gated_training_runs_one_grid_per_micro_batch_without_per_sample_sides(fmnist_dir, tmp_path, monkeypatch):
    from sprintdit.config import load_config
    from sprintdit.training import Trainer

    cfg = load_config(
        None,
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "model.arch=sparsedit",
            "model.sprint.fusion=none",
            "model.sprint.path_drop_prob=0",
            "model.sparse.grid=2:4",
            "model.sparse.pool_depth=1",
            "model.sparse.modules=1",
            "model.sparse.sparse_depth=1",
            "model.sparse.dense_depth=0",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.sample_every=0",
            "train.sparse_gating=true",
            "sample.guidance=cfg",
            "stages=[{name: ft, steps: 3, lr: 0.001, mask_ratio: 0.0}]",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "g", progress=False)
    seen = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "sides", lambda t: pytest.fail("a gated step chose grid sides per sample"))
    monkeypatch.setattr(
        trainer.model, "forward", lambda *a, side=None, **k: seen.append(side) or forward(*a, side=side, **k)
    )
    trainer.fit()
    # 3 steps x 2 micro-batches
    assert seen == [gate_at(trainer._gates, n).side for n in range(6)] and len(set(seen)) > 1
    with pytest.raises(UserError, match="sparse_gating"):
        load_config(None, ["train.sparse_gating=true"])


def test_sampling_chooses_the_grid_on_the_host_from_each_steps_t(monkeypatch):
    """Every sample of a sampling step shares t, so the sampler names the grid side (step_options) and the model never
    reads t back from the device; the samples equal the per-sample choice's."""
    from sprintdit.sampling import SampleConfig, generate

    _, sparse = dense_and_sparse()
    sparse.float()
    fm, cfg = (
        FlowMatching(ObjectiveConfig(), null_class=sparse.null_class),
        SampleConfig(steps=4, guidance="cfg", scale=2.0),
    )
    sides_of_t, seen = sparse.sides, []
    monkeypatch.setattr(sparse, "sides", lambda t: seen.append(len(t)) or sides_of_t(t))
    chosen = generate(sparse, fm, [1, 2], [0, 1], cfg, "cpu")
    assert seen == []  # the side came from the host's t
    monkeypatch.setattr(sparse, "step_options", lambda t: {})  # the per-sample choice (reads t off the tensor)
    assert torch.equal(generate(sparse, fm, [1, 2], [0, 1], cfg, "cpu"), chosen) and seen == [4] * 4  # 4 steps of 2 x 2
