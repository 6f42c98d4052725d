"""PixArt-alpha's transformer: diffusers' PixArtTransformer2DModel, built from small random configs, imported into
sprintdit's backbone must compute the same outputs (several latent sizes and aspect ratios, padded captions), export
back to the same tensors, and be counted right by the FLOPs model."""

import json

import pytest
import torch
from test_flops import counted

from sprintdit.convert import ConvertOptions, convert, export_diffusers
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops
from sprintdit.models import SiT, resolve_model_config

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, cross_attention_dim=16,
    caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False,
)  # fmt: skip
TOKENS = 5  # caption length of the test embeddings


def pixart(tmp_path, **changes):
    """A random PixArtTransformer2DModel in float64, saved as a diffusers folder."""
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(**{**CONFIG, **changes}).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero inits, so every tensor matters
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def caption(batch: int, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5-like embeddings (B, L, E) with the rows after each caption's length zeroed, and the matching mask."""
    emb = torch.randn(batch, TOKENS, CONFIG["caption_channels"], dtype=torch.float64)
    mask = torch.arange(TOKENS)[None] < torch.tensor(kept)[:, None]  # (B, L)
    return emb * mask[..., None], mask


@pytest.mark.parametrize("size", [[8, 8], [6, 10], [12, 8], [16, 16]])
def test_imported_pixart_equals_diffusers(tmp_path, size):
    theirs, folder = pixart(tmp_path)
    converted = convert(folder, ConvertOptions("diffusers", input_size=size))
    cfg = converted.model
    assert (cfg.adaln, cfg.pos_base, cfg.learn_sigma, cfg.qk_norm) == ("single", 4, True, False)
    ours = SiT(cfg).double().eval()
    ours.load_state_dict(converted.weights)
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    steps = torch.tensor([3, 500, 999])
    emb, mask = caption(3, [5, 2, 1])
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=emb, timestep=steps, encoder_attention_mask=mask.double(),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
        padded = torch.nn.functional.pad(emb, (0, 0, 0, cfg.text.max_tokens - TOKENS))  # our captions: 120 rows
        got = ours(x, steps.double() / 1000, padded)
    # float64 throughout but for diffusers' sinusoids (timestep frequencies, positions), made in float32
    torch.testing.assert_close(got, want, rtol=0, atol=3e-7)


def test_export_round_trips_and_loads_in_diffusers(tmp_path):
    theirs, folder = pixart(tmp_path, interpolation_scale=2)
    converted = convert(folder, ConvertOptions("diffusers"))
    assert converted.model.pos_interpolation == 2.0
    tensors, config = export_diffusers(converted.weights, converted.model)
    again = diffusers.PixArtTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    again.load_state_dict(tensors)  # strict: the same names and shapes
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(tensors[name].double(), value, rtol=0, atol=1e-7)  # float32 copies
    assert json.loads(json.dumps(config))["_class_name"] == "PixArtTransformer2DModel"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"norm_type": "ada_norm_zero"}, "only ada_norm_single converts"),
        ({"cross_attention_dim": 32}, "is not the width 16"),
        ({"out_channels": 5}, "5 output channels"),
    ],
)
def test_unsupported_pixart_variants_are_refused_in_one_line(tmp_path, changes, message):
    _, folder = pixart(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))  # as a variant's config.json says
    with pytest.raises(UserError, match=message):
        convert(folder, ConvertOptions("diffusers"))


def test_pixart_layout_flops_match_torch_counter(tmp_path):
    """adaLN-single: one shared projection, no per-block modulation; sin-cos positions scaled to the base grid."""
    _, folder = pixart(tmp_path)
    cfg = resolve_model_config(convert(folder, ConvertOptions("diffusers")).model)
    model = SiT(cfg).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert counted(model, x, t, torch.randn(2, cfg.text.max_tokens, CONFIG["caption_channels"])) == forward_flops(
        cfg, 2
    )


def test_cli_converts_a_pixart_folder_with_pixarts_sampling_defaults(tmp_path, capsys):
    from sprintdit.checkpoint import load_model
    from sprintdit.cli import main

    _, folder = pixart(tmp_path)
    assert main(["convert", "--from", "diffusers", "--checkpoint", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "PixArt-layout" in capsys.readouterr().out
    model, run = load_model(tmp_path / "run")
    assert (run.objective.kind, run.sample.sampler, run.sample.steps, run.sample.guidance, run.sample.scale) == (
        "ddpm", "dpm-solver++", 20, "cfg", 4.5,
    )  # fmt: skip
    assert (
        main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "x")])
        == 0
    )
    again = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "x")  # loads in diffusers
    assert again.config.num_layers == CONFIG["num_layers"] and not again.config.use_additional_conditions


def test_sprint_adapter_on_an_imported_pixart_is_the_source_at_mask_0(tmp_path):
    from sprintdit.checkpoint import load_model
    from sprintdit.convert import write_run
    from sprintdit.masking import make_mask
    from sprintdit.sections import SprintConfig
    from sprintdit.sparsify import adapt

    _, folder = pixart(tmp_path)
    write_run(tmp_path / "run", convert(folder, ConvertOptions("diffusers")), "diffusers")
    adapt(tmp_path / "run", tmp_path / "adapted", SprintConfig(encoder_depth=1, decoder_depth=1))
    (source, _), (adapted, run) = load_model(tmp_path / "run"), load_model(tmp_path / "adapted")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    emb = torch.nn.functional.pad(caption(2, [5, 3])[0].float(), (0, 0, 0, run.model.text.max_tokens - TOKENS))
    with torch.no_grad():
        assert torch.equal(adapted(x, t, emb), source(x, t, emb))
        mask = make_mask(2, run.model.grid, 0.75, "structured", torch.Generator().manual_seed(0))
        assert torch.isfinite(adapted(x, t, emb, mask=mask)).all()  # the middle on a quarter of the tokens
        assert adapted(x, t, emb, middle_rows=1).shape == (2, 8, 8, 8)  # PDG's cheap pass exists now


def test_sparsify_of_an_imported_pixart_runs_with_its_captions(tmp_path):
    """SparseDiT on PixArt: Poolingformers and sparse-dense modules with cross-attention to the caption kept in every
    block; the output is finite at every grid side of the schedule, and the FLOPs at each side match torch's count."""
    from sprintdit.checkpoint import load_model
    from sprintdit.convert import write_run
    from sprintdit.density import SparseConfig
    from sprintdit.sparsify import sparsify

    _, folder = pixart(tmp_path, num_layers=6)
    write_run(tmp_path / "run", convert(folder, ConvertOptions("diffusers")), "diffusers")
    layout = SparseConfig(grid="2:4", pool_depth=1, modules=1, sparse_depth=1, dense_depth=1)
    sparsify(tmp_path / "run", tmp_path / "sparse", layout)
    model, run = load_model(tmp_path / "sparse")
    assert type(model).__name__ == "SparseDiT" and all(b.cross_attn is not None for b in model.blocks)
    x = torch.randn(2, 4, 8, 8)
    emb = torch.nn.functional.pad(caption(2, [5, 2])[0].float(), (0, 0, 0, run.model.text.max_tokens - TOKENS))
    for side in (2, 3, 4):
        t = torch.full((2,), 0.5)
        with torch.no_grad():
            assert torch.isfinite(model(x, t, emb, side=side)).all()
        assert counted(model, x, t, emb, side=side) == forward_flops(run.model, 2, side=side)


@pytest.mark.parametrize("size", [[8, 8], [6, 10]])
def test_imported_pixart_1024_micro_conditions_equal_diffusers(tmp_path, size):
    """PixArt-alpha 1024's micro-conditions: diffusers is told the image's height, width and aspect ratio; ours derives
    them from its latent size (x 8), so the same numbers reach the same embedders."""
    theirs, folder = pixart(tmp_path, num_attention_heads=3, cross_attention_dim=24, use_additional_conditions=True)
    converted = convert(folder, ConvertOptions("diffusers", input_size=size))
    assert converted.model.micro_conditions
    ours = SiT(converted.model).double().eval()
    ours.load_state_dict(converted.weights)
    x, steps = torch.randn(2, 4, *size, dtype=torch.float64), torch.tensor([10, 700])
    emb, mask = caption(2, [4, 5])
    pixels = torch.tensor([[8.0 * size[0], 8.0 * size[1]]] * 2, dtype=torch.float64)
    micro = {"resolution": pixels, "aspect_ratio": (pixels[:, :1] / pixels[:, 1:])}
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=emb, timestep=steps, encoder_attention_mask=mask.double(),
                      added_cond_kwargs=micro).sample  # fmt: skip
        padded = torch.nn.functional.pad(emb, (0, 0, 0, converted.model.text.max_tokens - TOKENS))
        got = ours(x, steps.double() / 1000, padded)
        other = theirs(x, encoder_hidden_states=emb, timestep=steps, encoder_attention_mask=mask.double(),
                       added_cond_kwargs={k: v * 2 for k, v in micro.items()}).sample  # fmt: skip
    assert (other - want).abs().max() > 1e-3  # the conditions reach the output: the check can fail
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # float32 sinusoids of 2 more embedders in diffusers
    assert counted(ours.float(), x.float(), steps / 1000, padded.float()) == forward_flops(converted.model, 2)
    tensors, config = export_diffusers(converted.weights, converted.model)
    assert config["use_additional_conditions"] and set(tensors) == set(theirs.state_dict())
