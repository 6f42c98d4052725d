"""`sprintdit convert`: released layouts built here from their documented keys and shapes, converted, and
compared with reference forwards written for those layouts (not with our network's code)."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sprintdit.checkpoint import load_model
from sprintdit.cli import main
from sprintdit.convert import ConvertOptions, convert
from sprintdit.errors import UserError
from sprintdit.masking import make_mask
from sprintdit.models import SiT

WIDTH, HEADS, PATCH, CHANNELS, SIDE, CLASSES = 64, 2, 2, 3, 8, 5  # a 4x4 token grid; width 64 is size Nano's (2 heads)
GRID = SIDE // PATCH


# ----------------------------------------------------------------------------------- released layouts


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """DiT's fixed table (N, dim), written per token: [sin, cos] of the column, then of the row."""
    quarter = dim // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    rows = []
    for row in range(grid):
        for col in range(grid):
            rows.append([f(pos * w) for pos in (col, row) for f in (math.sin, math.cos) for w in omega])
    return torch.tensor(rows, dtype=torch.float32)


def block_tensors(g: torch.Generator, qk_norm: bool, mlp_ratio: int = 4) -> dict:
    d, hidden = WIDTH, WIDTH * mlp_ratio
    shapes = {
        "attn.qkv": (3 * d, d),
        "attn.proj": (d, d),
        "mlp.fc1": (hidden, d),
        "mlp.fc2": (d, hidden),
        "adaLN_modulation.1": (6 * d, d),
    }
    out = {}
    for name, (rows, cols) in shapes.items():
        out[f"{name}.weight"] = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        out[f"{name}.bias"] = torch.randn(rows, generator=g) * 0.1
    if qk_norm:
        for name in ("attn.q_norm.weight", "attn.k_norm.weight"):
            out[name] = 1 + 0.3 * torch.randn(WIDTH // HEADS, generator=g)
    return out


def shared_tensors(g: torch.Generator, out_channels: int) -> dict:
    """Timestep MLP, label table and final layer: random, non-zero (adaLN-Zero would hide bugs)."""
    d = WIDTH
    return {
        "t_embedder.mlp.0.weight": torch.randn(d, 256, generator=g) / 16,
        "t_embedder.mlp.0.bias": torch.randn(d, generator=g) * 0.1,
        "t_embedder.mlp.2.weight": torch.randn(d, d, generator=g) / math.sqrt(d),
        "t_embedder.mlp.2.bias": torch.randn(d, generator=g) * 0.1,
        "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, d, generator=g),
        "final_layer.linear.weight": torch.randn(PATCH * PATCH * out_channels, d, generator=g) / math.sqrt(d),
        "final_layer.linear.bias": torch.randn(PATCH * PATCH * out_channels, generator=g) * 0.1,
        "final_layer.adaLN_modulation.1.weight": torch.randn(2 * d, d, generator=g) / math.sqrt(d),
        "final_layer.adaLN_modulation.1.bias": torch.randn(2 * d, generator=g) * 0.1,
    }


def dit_layout(seed: int = 0, depth: int = 3, learn_sigma: bool = True) -> dict:
    """facebookresearch/DiT (and willisma/SiT) keys: Conv2d patch embedding, fixed pos_embed, blocks.{i}."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "x_embedder.proj.weight": torch.randn(WIDTH, CHANNELS, PATCH, PATCH, generator=g)
        / math.sqrt(CHANNELS * PATCH * PATCH),
        "x_embedder.proj.bias": torch.randn(WIDTH, generator=g) * 0.1,
        "pos_embed": sincos_table(GRID, WIDTH).unsqueeze(0),
        **shared_tensors(g, CHANNELS * (2 if learn_sigma else 1)),
    }
    for i in range(depth):
        state.update({f"blocks.{i}.{k}": v for k, v in block_tensors(g, qk_norm=False).items()})
    return state


def sprint_layout(seed: int = 0, split=(1, 2, 1), prefix: str = "_orig_mod.", projectors: bool = True) -> dict:
    """The SPRINT release's keys (spec): Linear patch embedding, three block lists, renoise_linear, mask_token."""
    g = torch.Generator().manual_seed(seed)
    features = CHANNELS * PATCH * PATCH
    state = {
        "x_embedder.proj.weight": torch.randn(WIDTH, features, generator=g) / math.sqrt(features),
        "x_embedder.proj.bias": torch.randn(WIDTH, generator=g) * 0.1,
        "renoise_linear.weight": torch.randn(WIDTH, 2 * WIDTH, generator=g) / math.sqrt(2 * WIDTH),
        "renoise_linear.bias": torch.randn(WIDTH, generator=g) * 0.1,
        "mask_token": torch.randn(1, 1, WIDTH, generator=g),
        **shared_tensors(g, CHANNELS),
    }
    for stage, depth in zip(("encoder_blocks", "middle_blocks", "decoder_blocks"), split):
        for i in range(depth):
            state.update({f"{stage}.{i}.{k}": v for k, v in block_tensors(g, qk_norm=True).items()})
    if projectors:
        for i, (rows, cols) in zip((0, 2, 4), ((16, WIDTH), (16, 16), (8, 16))):
            state[f"projectors.{i}.weight"], state[f"projectors.{i}.bias"] = (
                torch.randn(rows, cols, generator=g),
                torch.zeros(rows),
            )
    return {prefix + k: v for k, v in state.items()}


# ----------------------------------------------------------------------------------- reference forwards


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """[cos, sin] of t * 10000^(-i/128), computed in float32 as DiT / SiT do."""
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1).double()


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def rotate(x, angles):
    """RoPE on adjacent channel pairs, as complex multiplication by exp(i * angle); angles (N, dh/2)."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def rope_angles(positions, head_dim: int) -> torch.Tensor:
    """(N, head_dim/2) pair angles: first half of the head dim rotates by row, second half by column."""
    m = head_dim // 2
    freqs = [10000.0 ** (-j / m) for j in range(0, m, 2)]
    return torch.tensor([[r * f for f in freqs] + [c * f for f in freqs] for r, c in positions], dtype=torch.float64)


def attention(x, sd, prefix, angles=None):
    b, n, d = x.shape
    dh = d // HEADS
    q, k, v = linear(x, sd, f"{prefix}attn.qkv").reshape(b, n, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
    if f"{prefix}attn.q_norm.weight" in sd:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{prefix}attn.q_norm.weight"]
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{prefix}attn.k_norm.weight"]
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    return linear((weights @ v).transpose(1, 2).reshape(b, n, d), sd, f"{prefix}attn.proj")


def block(x, c, sd, prefix, angles=None):
    mod = linear(F.silu(c), sd, f"{prefix}adaLN_modulation.1")[:, None]  # (B, 1, 6D)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
    x = x + gate_a * attention(layer_norm(x) * (1 + scale_a) + shift_a, sd, prefix, angles)
    h = linear(layer_norm(x) * (1 + scale_m) + shift_m, sd, f"{prefix}mlp.fc1")
    return x + gate_m * linear(F.gelu(h, approximate="tanh"), sd, f"{prefix}mlp.fc2")


def final(x, c, sd):
    shift, scale = linear(F.silu(c), sd, "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    return linear(layer_norm(x) * (1 + scale) + shift, sd, "final_layer.linear")


def conditioning(sd, t, y):
    h = linear(timestep_features(t), sd, "t_embedder.mlp.0")
    return linear(F.silu(h), sd, "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]


def dit_reference(sd, x, t, y):
    """facebookresearch/DiT's forward: Conv2d patches + pos_embed, blocks, un-patchify in (p_row, p_col, c)."""
    sd = {k: v.double() for k, v in sd.items()}
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    c = conditioning(sd, t, y)
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h = block(h, c, sd, f"blocks.{i}.")
    out = final(h, c, sd)  # (B, N, p*p*C_out)
    b = out.shape[0]
    out = out.reshape(b, GRID, GRID, PATCH, PATCH, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, SIDE, SIDE)


def sprint_reference(sd, x, t, y, keep=None):
    """The SPRINT release's forward: encoder on all tokens, middle on the kept ones (RoPE of their true
    positions), MASK at dropped positions, renoise_linear(cat[sparse, dense]), decoder, (c, p_row, p_col)."""
    sd = {k.removeprefix("_orig_mod."): v.double() for k, v in sd.items()}
    h = linear(F.unfold(x, PATCH, stride=PATCH).transpose(1, 2), sd, "x_embedder.proj")  # unfold: (c, p_row, p_col)
    positions = [(n // GRID, n % GRID) for n in range(GRID * GRID)]
    angles = rope_angles(positions, WIDTH // HEADS)
    c = conditioning(sd, t, y)
    stage = lambda name: sorted({int(k.split(".")[1]) for k in sd if k.startswith(name)})  # noqa: E731
    for i in stage("encoder_blocks"):
        h = block(h, c, sd, f"encoder_blocks.{i}.", angles)
    dense = h
    restored = []
    for row in range(x.shape[0]):
        ids = torch.arange(GRID * GRID) if keep is None else keep[row]
        s = h[row : row + 1, ids]
        for i in stage("middle_blocks"):
            s = block(s, c[row : row + 1], sd, f"middle_blocks.{i}.", angles[ids])
        full = sd["mask_token"].expand(1, GRID * GRID, WIDTH).clone()
        full[:, ids] = s
        restored.append(full)
    h = linear(torch.cat([torch.cat(restored), dense], dim=-1), sd, "renoise_linear")
    for i in stage("decoder_blocks"):
        h = block(h, c, sd, f"decoder_blocks.{i}.", angles)
    return F.fold(final(h, c, sd).transpose(1, 2), (SIDE, SIDE), PATCH, stride=PATCH)


def inputs(seed: int = 3, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=g, dtype=torch.float64)
    return x, torch.rand(batch, generator=g, dtype=torch.float64), torch.tensor([0, CLASSES, 2][:batch])


def ours(weights, model_cfg):
    from sprintdit.models import SiT

    model = SiT(model_cfg).double().eval()
    model.load_state_dict(weights)
    return model


# ----------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_matches_reference_forward(tmp_path, learn_sigma):
    sd = dit_layout(learn_sigma=learn_sigma)
    path = tmp_path / "dit.pt"
    torch.save(sd, path)
    converted = convert(path, ConvertOptions("dit"))
    cfg = converted.model
    assert (cfg.pos_embed, cfg.qk_norm, cfg.sprint.fusion, cfg.learn_sigma, cfg.time_scale) == (
        "sincos",
        False,
        "none",
        learn_sigma,
        1000.0,
    )
    assert (cfg.num_heads, cfg.depth, cfg.input_size) == (
        HEADS,
        3,
        [SIDE, SIDE],
    )  # heads from the size of width 64: no q_norm, no --num-heads
    x, _, y = inputs()
    k = torch.tensor([0.0, 417.0, 999.0], dtype=torch.float64)  # DiT: integer steps into the sinusoids; ours: t = k / T
    with torch.no_grad():
        torch.testing.assert_close(
            ours(converted.ema, cfg)(x, k / 1000, y), dit_reference(sd, x, k, y), rtol=0, atol=1e-9
        )
    # every source tensor is used: all but the fixed pos_embed, plus our MASK token
    assert len(converted.ema) == len(sd) - 1 + 1 and "pos_embed" not in converted.ema


def test_sit_velocity_is_minus_sit_at_flipped_time(tmp_path):
    sd = dit_layout(seed=1)
    path = tmp_path / "sit.safetensors"
    save_file({"module." + k: v for k, v in sd.items()}, str(path))  # a DDP-prefixed state dict
    converted = convert(path, ConvertOptions("sit", num_heads=HEADS))
    x, t, y = inputs()
    with torch.no_grad():
        out = ours(converted.ema, converted.model)(x, t, y)
        ref = dit_reference(sd, x, 1 - t, y)  # SiT's time: 1 is data
    torch.testing.assert_close(out[:, :CHANNELS], -ref[:, :CHANNELS], rtol=0, atol=1e-5)  # v = eps - x0 = -(x0 - eps)
    torch.testing.assert_close(out[:, CHANNELS:], ref[:, CHANNELS:], rtol=0, atol=1e-5)  # unused sigma half: same time
    assert torch.allclose(ref, dit_reference(sd, x, 1 - t, y)) and not torch.allclose(
        ref, dit_reference(sd, x, t, y), atol=1e-3
    )


def test_sprint_matches_reference_dense_and_token_dropped(tmp_path, capsys):
    sd = sprint_layout()
    path = tmp_path / "sprint.pt"
    torch.save({"model": sd, "ema": sd, "steps": 10, "args": argparse.Namespace(model="SiT-XL/2", lr=1e-4)}, path)
    converted = convert(path, ConvertOptions("sprint", input_size=[SIDE, SIDE]))
    cfg = converted.model
    assert (
        cfg.sprint.encoder_depth,
        cfg.middle_depth,
        cfg.sprint.decoder_depth,
        cfg.num_heads,
        cfg.qk_norm,
        cfg.sprint.fusion,
    ) == (1, 2, 1, HEADS, True, "concat_linear")
    assert any("projectors" in note for note in converted.notes)
    model = ours(converted.ema, cfg)
    x, t, y = inputs()
    mask = make_mask(3, cfg.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    with torch.no_grad():
        # our RoPE tables are stored in float32, hence 1e-6 rather than float64 round-off
        torch.testing.assert_close(model(x, t, y), sprint_reference(sd, x, t, y), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            model(x, t, y, mask=mask), sprint_reference(sd, x, t, y, keep=mask.ids_keep), rtol=0, atol=1e-6
        )
    dropped = [k for k in sd if ".projectors." in "." + k]
    assert len(converted.ema) == len(sd) - len(dropped)


# ----------------------------------------------------------------------------------- refusals and errors


class Payload:
    """Unpickling this would create a file: the converter must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"ema": dit_layout(), "hook": Payload(marker)}, path)
    with pytest.raises(UserError, match="refusing to unpickle .*open"):
        convert(path, ConvertOptions("dit"))
    assert not marker.exists()


def broken(change):
    sd = dit_layout()
    change(sd)
    return sd


@pytest.mark.parametrize(
    "state,options,message",
    [
        (broken(lambda sd: sd.pop("blocks.1.mlp.fc2.bias")), {}, "lacks 'blocks.1.mlp.fc2.bias'"),
        (
            broken(lambda sd: sd.update({"blocks.0.attn.proj.weight": torch.zeros(WIDTH, WIDTH + 1)})),
            {},
            "'blocks.0.attn.proj.weight' has shape [64, 65]; this model needs [64, 64]",
        ),
        (
            broken(lambda sd: sd.update({"blocks.0.norm1.weight": torch.ones(WIDTH)})),
            {},
            "unexpected 'blocks.0.norm1.weight'",
        ),
        (broken(lambda sd: sd["pos_embed"].add_(0.01)), {}, "not the fixed 2D sin-cos table"),
        (broken(lambda sd: sd.update({"pos_embed": sd["pos_embed"][:, :12]})), {}, "not a square grid"),
        (broken(lambda sd: sd.pop("x_embedder.proj.weight")), {}, "no 'x_embedder.proj.weight'"),
        (dit_layout(), {"preset": "DiT-XL/2"}, "not preset SiT-XL/2"),
        (dit_layout(), {"source": "sprint"}, "a sprint checkpoint has a 2-d tensor there"),  # the wrong --from
        (
            sprint_layout(),
            {"source": "sprint", "input_size": [SIDE, SIDE], "patch_size": 5},
            "not a multiple of patch size 5",
        ),
    ],
)
def test_bad_checkpoints_give_one_line(tmp_path, state, options, message):
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        convert(path, ConvertOptions(**{"source": "dit", **options}))
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- command line


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_converts_a_dit_training_checkpoint(tmp_path, capsys):
    model_sd, ema_sd = dit_layout(seed=4), dit_layout(seed=5)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(
        {"model": model_sd, "ema": ema_sd, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-XL/2")}, path
    )
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "convert", "--from", "dit", "--checkpoint", path, "--out", run)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("converted dit") and str(run) in out
    x, _, y = inputs()
    k = torch.tensor([3.0, 250.0, 998.0], dtype=torch.float64)
    for use_ema, sd in ((True, ema_sd), (False, model_sd)):
        model, cfg = load_model(run, use_ema=use_ema)
        assert cfg.objective.kind == "ddpm" and cfg.sample.guidance == "cfg" and cfg.sample.sampler == "ddpm"
        with torch.no_grad():
            torch.testing.assert_close(model.double()(x, k / 1000, y), dit_reference(sd, x, k, y), rtol=0, atol=1e-5)
    code, _, err = run_cli(capsys, "convert", "--from", "dit", "--checkpoint", path, "--out", run)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", run, "--out", tmp_path / "s", "--labels", "1", "--steps", "2", "--no-progress"
    )
    assert code == 0, err
    assert np.load(tmp_path / "s" / "cfg_ddpm2_s1.5.npz")["arr_0"].shape == (1, SIDE, SIDE, CHANNELS)
    code, _, err = run_cli(  # DPM-Solver++, PixArt's sampler
        capsys, "sample", "--checkpoint", run, "--out", tmp_path / "s", "--labels", "1", "--steps", "3",
        "--sampler", "dpm-solver++", "--timestep-spacing", "trailing", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "s" / "cfg_dpm-solver++3_s1.5.npz")["arr_0"].shape == (1, SIDE, SIDE, CHANNELS)
    # a released DiT becomes a SparseDiT (DDPM objective kept) that samples
    code, _, err = run_cli(
        capsys,
        "sparsify",
        "--checkpoint",
        run,
        "--out",
        tmp_path / "sparse",
        "--sparse-grid",
        "2:3",
        "--pool-depth",
        "1",
        "--modules",
        "1",
        "--sparse-depth",
        "0",
        "--dense-depth",
        "0",
    )
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        tmp_path / "sparse",
        "--out",
        tmp_path / "s2",
        "--labels",
        "1",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--no-progress",
    )
    assert code == 0, err


def test_cli_converted_sit_samples(tmp_path, capsys):
    path = tmp_path / "sit.safetensors"
    save_file(dit_layout(seed=6), str(path))
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "convert", "--from", "sit", "--checkpoint", path, "--out", run, "--num-heads", HEADS
    )
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        run,
        "--out",
        tmp_path / "s",
        "--labels",
        "0-1",
        "--steps",
        "2",
        "--no-progress",
    )
    assert code == 0, err
    npz = np.load(tmp_path / "s" / "cfg_euler2_s1.5.npz")
    assert npz["arr_0"].shape == (2, SIDE, SIDE, CHANNELS) and npz["arr_1"].tolist() == [0, 1]


def test_cli_sprint_needs_input_size_and_converts_with_it(tmp_path, capsys):
    path = tmp_path / "sprint.pt"
    torch.save(sprint_layout(), path)
    code, _, err = run_cli(capsys, "convert", "--from", "sprint", "--checkpoint", path, "--out", tmp_path / "a")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--input-size" in err
    code, out, err = run_cli(
        capsys, "convert", "--from", "sprint", "--checkpoint", path, "--out", tmp_path / "b", "--input-size", SIDE
    )
    assert code == 0, err
    assert "note: dropped the REPA projection head" in out and "blocks 1/2/1" in out
    model, cfg = load_model(tmp_path / "b")
    assert cfg.objective.kind == "flow" and cfg.model.input_size == [SIDE, SIDE]


# ----------------------------------------------------------------------------------- Latte's original release

FRAMES = 4


def latte_layout(seed: int = 0, depth: int = 4, conditional: bool = True) -> dict:
    """Vchitect/Latte's models/latte.py keys: DiT's, with blocks alternating spatial / temporal, pos_embed of one
    frame's grid and temp_embed (1, F, D), the fixed 1D sin-cos table of the frames."""
    state = dit_layout(seed, depth)
    state["temp_embed"] = frames_table(FRAMES, WIDTH).unsqueeze(0)
    if not conditional:
        del state["y_embedder.embedding_table.weight"]
    return state


def frames_table(frames: int, dim: int) -> torch.Tensor:
    """Latte's get_1d_sincos_temp_embed (F, dim), written per frame: [sin, cos] of f * 10000^(-i / (dim / 2))."""
    omega = [1.0 / 10000 ** (i / (dim // 2)) for i in range(dim // 2)]
    return torch.tensor([[f(n * w) for f in (math.sin, math.cos) for w in omega] for n in range(frames)])


def latte_reference(sd, x, t, y):
    """Latte's forward (models/latte.py): frames as a batch of images, blocks in (spatial, temporal) pairs with
    rearranges between, temp_embed added after the first spatial block, c = t + y for every block and the final
    layer; x (B, C, F, H, W) here -> (B, C_out, F, H, W)."""
    sd = {k: v.double() for k, v in sd.items()}
    b, f = x.shape[0], x.shape[2]
    frames = x.transpose(1, 2).reshape(b * f, CHANNELS, SIDE, SIDE)
    h = F.conv2d(frames, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH).flatten(2)
    h = h.transpose(1, 2) + sd["pos_embed"]  # (B F, N, D)
    c = conditioning(sd, t, y) if "y_embedder.embedding_table.weight" in sd else unconditioned(sd, t)  # (B, D)
    n, d = h.shape[1], h.shape[2]
    for i in range(0, len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), 2):
        h = block(h, c.repeat_interleave(f, 0), sd, f"blocks.{i}.")
        h = h.reshape(b, f, n, d).transpose(1, 2).reshape(b * n, f, d)
        if i == 0:
            h = h + sd["temp_embed"]
        h = block(h, c.repeat_interleave(n, 0), sd, f"blocks.{i + 1}.")
        h = h.reshape(b, n, f, d).transpose(1, 2).reshape(b * f, n, d)
    out = final(h, c.repeat_interleave(f, 0), sd).reshape(b * f, GRID, GRID, PATCH, PATCH, -1)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(b, f, -1, SIDE, SIDE)
    return out.transpose(1, 2)


def unconditioned(sd, t):
    return linear(F.silu(linear(timestep_features(t), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")


@pytest.mark.parametrize("conditional", [True, False])
def test_latte_release_converts_to_the_factorised_layout(tmp_path, conditional):
    """A class-conditional (UCF101) or unconditional (FaceForensics, SkyTimelapse, Taichi) Latte checkpoint: our
    factorised network computes Latte's forward; the tables are checked and dropped."""
    sd = latte_layout(conditional=conditional)
    path = tmp_path / "latte.pt"
    torch.save({"ema": sd}, path)
    converted = convert(path, ConvertOptions("latte"))
    cfg = converted.model
    assert (cfg.video_layout, cfg.input_size, cfg.depth, cfg.num_classes) == (
        "factorised",
        [FRAMES, SIDE, SIDE],
        4,
        CLASSES if conditional else 1,
    )
    model = SiT(cfg).double().eval()
    model.load_state_dict(converted.weights)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, CHANNELS, FRAMES, SIDE, SIDE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.004, 0.7], dtype=torch.float64)  # DDPM steps 4 and 700
    y = torch.tensor([1, 3]) if conditional else torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), latte_reference(sd, x, t * 1000, y), rtol=0, atol=1e-9)
    bad = {**sd, "temp_embed": sd["temp_embed"] * 1.1}
    torch.save(bad, path)
    with pytest.raises(UserError, match="temp_embed is not the fixed sin-cos table of 4 frames"):
        convert(path, ConvertOptions("latte"))
