"""PixArt-alpha's transformer: diffusers' PixArtTransformer2DModel, built from small random configs, imported into
sprintdit's backbone must compute the same outputs (several latent sizes and aspect ratios, padded captions), export
back to the same tensors, and be counted right by the FLOPs model."""

import json

import numpy as np
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


# ----------------------------------------------------------------------------------- the original release's layout


def original_layout(theirs, base: int, lewei: float, micro: bool = False) -> dict[str, torch.Tensor]:
    """diffusers' PixArt weights in the original release's key layout (PixArt / PixArtMS state_dict), written from
    the release's model code: qkv stacked, q_linear / kv_linear, y_proj, csize / ar embedders, the pos_embed
    buffer of its base grid, and a learned null caption y_embedding."""
    sd, out = theirs.state_dict(), {}
    renames = {
        "pos_embed.proj.": "x_embedder.proj.", "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "adaln_single.linear.": "t_block.1.",
        "caption_projection.linear_1.": "y_embedder.y_proj.fc1.", "caption_projection.linear_2.":
        "y_embedder.y_proj.fc2.", "proj_out.": "final_layer.linear.", "transformer_blocks.": "blocks.",
        "attn1.to_out.0.": "attn.proj.", "attn2.to_out.0.": "cross_attn.proj.", "attn2.to_q.": "cross_attn.q_linear.",
        "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
        "adaln_single.emb.resolution_embedder.linear_": "csize_embedder.mlp.",
        "adaln_single.emb.aspect_ratio_embedder.linear_": "ar_embedder.mlp.",
    }  # fmt: skip
    for key, value in sd.items():
        if any(part in key for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v")):
            continue
        name = "final_layer.scale_shift_table" if key == "scale_shift_table" else key
        for theirs_part, ours in renames.items():
            name = name.replace(theirs_part, ours)
        name = name.replace("mlp.1.", "mlp.0.") if "_embedder.mlp." in name else name  # linear_1 -> mlp.0
        out[name] = value.float()
    for i in range(theirs.config.num_layers):
        for w in ("weight", "bias"):
            qkv = [sd[f"transformer_blocks.{i}.attn1.to_{p}.{w}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat(qkv).float()
            kv = [sd[f"transformer_blocks.{i}.attn2.to_{p}.{w}"] for p in "kv"]
            out[f"blocks.{i}.cross_attn.kv_linear.{w}"] = torch.cat(kv).float()
    hidden = theirs.config.num_attention_heads * theirs.config.attention_head_dim
    out["pos_embed"] = diffusers.models.embeddings.get_2d_sincos_pos_embed(
        hidden, base, interpolation_scale=lewei, base_size=base
    ).float()[None]  # (1, N, D)
    out["y_embedder.y_embedding"] = torch.randn(7, CONFIG["caption_channels"])  # 7 tokens: read off the table
    assert micro == any(k.startswith("csize_embedder") for k in out)
    return out


@pytest.mark.parametrize("micro", [False, True])
def test_original_release_layout_imports_as_the_diffusers_folder_does(tmp_path, micro):
    changes = dict(use_additional_conditions=True, interpolation_scale=2, num_attention_heads=3, cross_attention_dim=24)
    theirs, folder = pixart(tmp_path, **(changes if micro else {}))
    state = original_layout(theirs, base=4, lewei=2.0 if micro else 1.0, micro=micro)
    path = tmp_path / "PixArt-XL-2-tiny.pth"
    torch.save({"state_dict": state, "step": 7}, path)  # the release's training dict (a non-dict entry too)
    original = convert(path, ConvertOptions("pixart", num_heads=theirs.config.num_attention_heads))
    via_diffusers = convert(folder, ConvertOptions("diffusers"))
    cfg = original.model
    assert (cfg.pos_base, cfg.pos_interpolation, cfg.micro_conditions) == (4, 2.0 if micro else 1.0, micro)
    assert (cfg.text.max_tokens, cfg.text.null_caption) == (7, "learned")
    assert set(original.weights) == set(via_diffusers.weights)
    for key, value in via_diffusers.weights.items():
        if key != "y_embedder.empty":  # diffusers has no null caption; the release's is its y_embedding
            torch.testing.assert_close(original.weights[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(original.weights["y_embedder.empty"], state["y_embedder.y_embedding"])


def test_original_layout_null_caption_is_masked_like_the_prompt(tmp_path):
    """The release samples its unconditional half with y_embedding under the prompt's mask (forward repeats the
    mask over the batch): the guided pass must give the network exactly that, and the learned table must reach
    the cross-attention unmasked where the prompt is long."""
    from sprintdit.objective import null_like

    theirs, _ = pixart(tmp_path)
    path = tmp_path / "tiny.pth"
    torch.save(original_layout(theirs, base=4, lewei=1.0), path)
    converted = convert(path, ConvertOptions("pixart", num_heads=CONFIG["num_attention_heads"]))
    ours = SiT(converted.model).double().eval()
    ours.load_state_dict(converted.weights)
    table = ours.null_class  # (7, E): the learned table itself
    assert torch.equal(table, ours.y_embedder.empty) and table.ne(0).all()
    prompts = torch.randn(2, 7, CONFIG["caption_channels"], dtype=torch.float64)
    prompts[0, 3:] = 0  # three tokens, then padding
    null = null_like(prompts, table)
    torch.testing.assert_close(null[0, :3], table[:3].double(), rtol=0, atol=0)
    assert not null[0, 3:].any() and torch.equal(null[1], table.double())
    tokens, keep = ours.y_embedder(null)
    assert keep[0].tolist() == [True] * 3 + [False] * 4 and keep[1].all()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("y_embedder.y_embedding"), "lacks y_embedder.y_embedding"),
        (lambda s: s.__setitem__("blocks.0.attn.sr.weight", torch.zeros(1)), "KV-compressed attention"),
        (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "missing ['blocks.1.mlp.fc2.bias']"),
        (lambda s: s.__setitem__("blocks.0.cross_attn.q_linear.weight", torch.zeros(3, 3)), "(3, 3) vs (16, 16)"),
        (lambda s: s.__setitem__("pos_embed", s["pos_embed"] * 1.01), "not PixArt's sin-cos table"),
    ],
)
def test_broken_original_checkpoints_are_refused_in_one_line(tmp_path, edit, message):
    theirs, _ = pixart(tmp_path)
    state = original_layout(theirs, base=4, lewei=1.0)
    edit(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=None) as err:
        convert(path, ConvertOptions("pixart", num_heads=CONFIG["num_attention_heads"]))
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the whole chain, as diffusers samples


PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    prediction_type="epsilon",
    timestep_spacing="linspace",
)  # fmt: skip  PixArt-alpha's scheduler_config.json (DPM-Solver++ 2M)
PROMPTS = ["a red bag on the left", "blue shoe"]
# a random network's noise prediction is far from the noise, so its x0 (hence the sample) is ~1/alpha_T = 150 times
# too large: a VAE scaling factor of that size brings the decoder's input back to unit scale (both pipelines read it)
LATENT_SCALE = 300.0


PIPELINES = {"alpha": ("PixArtAlphaPipeline", 120), "sigma": ("PixArtSigmaPipeline", 300)}  # class, caption tokens


@pytest.fixture
def pixart_chain(tmp_path, request):
    """diffusers' PixArtAlphaPipeline (or, parametrized "sigma", PixArtSigmaPipeline: 300 caption tokens) from tiny
    random parts (transformer, AutoencoderKL, T5 encoder and a word-level tokenizer), and the same transformer
    converted to a sprintdit run with no unconditional caption set."""
    from conftest import tiny_vae
    from test_captions import T5_DIM, tiny_encoder_folder

    from sprintdit.convert import write_run

    _, folder = pixart(tmp_path, caption_channels=T5_DIM)
    t5, vae = tiny_encoder_folder(tmp_path / "t5", "t5"), tiny_vae(tmp_path / "vae", 16, scaling_factor=LATENT_SCALE)
    transformers = pytest.importorskip("transformers")
    pipeline, tokens = PIPELINES[getattr(request, "param", "alpha")]
    pipe = getattr(diffusers, pipeline)(
        tokenizer=transformers.AutoTokenizer.from_pretrained(t5),
        text_encoder=transformers.T5EncoderModel.from_pretrained(t5),
        vae=diffusers.AutoencoderKL.from_pretrained(vae),
        transformer=diffusers.PixArtTransformer2DModel.from_pretrained(folder),  # float32, as both sample
        scheduler=diffusers.DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    run = tmp_path / "run"
    write_run(run, convert(folder, ConvertOptions("diffusers", caption_tokens=tokens)), "diffusers")
    return pipe, run, t5, vae


@pytest.mark.parametrize("pixart_chain", ["alpha", "sigma"], indirect=True)
def test_sprintdit_samples_a_converted_pixart_as_diffusers_pipeline_does(pixart_chain):
    """Prompts through the same T5, the empty negative prompt as the unconditional caption, DPM-Solver++ 20 steps,
    CFG 4.5, the same starting latents (our seeds' noise): the same latents, and the same images through the VAE;
    PixArt-alpha's pipeline (120 caption tokens) and PixArt-Sigma's (300)."""
    from sprintdit.api import sample_conditions
    from sprintdit.sampling import SampleNoise, generate
    from sprintdit.sampling_run import SamplingRun

    pipe, run_dir, t5, vae = pixart_chain
    run = SamplingRun.open(run_dir, device="cpu", vae=str(vae))
    tokens = run.config.model.text.max_tokens  # 120 (alpha) or 300 (sigma)
    cfg = run.sample_config()
    assert (cfg.sampler, cfg.steps, cfg.guidance, cfg.scale) == ("dpm-solver++", 20, "cfg", 4.5)  # PixArt's defaults
    seeds = [3, 11]
    with pytest.raises(UserError, match="unconditional caption is unset"):  # guidance needs it; nothing is guessed
        generate(run.model, run.objective, [torch.zeros(tokens, 16)] * 2, seeds, cfg, "cpu")
    conditions = sample_conditions(run.config.model, prompts=PROMPTS, text_encoder_path=str(t5), network=run.model)
    ours = generate(run.model, run.objective, conditions, seeds, cfg, "cpu")  # (2, 4, 8, 8)
    start = SampleNoise(seeds, "cpu").randn((4, 8, 8))
    call = dict(
        prompt=PROMPTS, negative_prompt="", latents=start, num_inference_steps=20, guidance_scale=4.5,
        height=16, width=16, use_resolution_binning=False, clean_caption=False, max_sequence_length=tokens,
    )  # fmt: skip
    with torch.no_grad():
        theirs = pipe(**call, output_type="latent").images
        images = pipe(**call, output_type="pt").images  # (2, 3, 16, 16) in [0, 1]
    assert (ours - start).abs().max() > 0.5  # it sampled
    # float32 both (our schedule in float64): equal to 1e-6 of the latents' scale (max difference seen 2.4e-7 of it)
    assert (ours - theirs).abs().max() < 1e-6 * theirs.abs().max()
    ours_images = ((run.to_pixels(ours) + 1) / 2).clamp(0, 1)
    assert 0.05 < images.mean() < 0.95 and images.std() > 0.01  # not saturated
    torch.testing.assert_close(ours_images, images, rtol=0, atol=1e-5)
    uncond = run.model.y_embedder.empty  # the empty prompt's embedding: the end token, then zero padding
    assert uncond[0].ne(0).any() and not uncond[1:].any()


def test_convert_fills_the_unconditional_caption_from_a_t5_folder_of_the_right_width(pixart_chain, tmp_path):
    from sprintdit.checkpoint import load_model

    _, run_dir, t5, _ = pixart_chain
    model, _ = load_model(run_dir)
    assert not model.y_embedder.empty.any()  # unset by a plain diffusers import
    filled = convert(run_dir.parent / "transformer", ConvertOptions("diffusers", text_encoder_path=str(t5)))
    empty = filled.weights["y_embedder.empty"]  # (120, 16): "" is the end token alone
    assert empty[0].ne(0).all() and not empty[1:].any()
    _, narrow = pixart(tmp_path / "narrow")  # captions of width 12: the 16-wide T5 does not fit
    with pytest.raises(UserError, match="gives width 16; this model reads 12"):
        convert(narrow, ConvertOptions("diffusers", text_encoder_path=str(t5)))
    with pytest.raises(UserError, match="text encoder folder .* is missing"):
        convert(narrow, ConvertOptions("diffusers", text_encoder_path=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("method", ["sparsedit", "sprint"])
def test_shipped_pixart_finetunes_run_end_to_end_on_captioned_latents(pixart_chain, tmp_path, capsys, method):
    """The README's commands on tiny parts: T5 caption rows and VAE latents prepared, the converted PixArt sparsified
    (or SPRINT-adapted), fine-tuned with the shipped config (SparseDiT: distilled from the dense model), then sampled
    from prompts through the VAE; the null caption and DDPM objective travel with the weights."""
    from test_captions import captioned_images

    from sprintdit.checkpoint import load_model
    from sprintdit.cli import main

    _, run, t5, vae = pixart_chain
    root, jsonl, _ = captioned_images.__wrapped__(tmp_path)

    def cli(*argv) -> None:
        code = main([str(a) for a in argv])
        assert code == 0, capsys.readouterr().err

    latents = tmp_path / "latents"
    cli("prepare", "--images", root, "--captions", jsonl, "--text-encoder", "t5", "--text-encoder-path", t5,
        "--max-tokens", 120, "--vae", vae, "--resolution", 16, "--out", latents)  # fmt: skip
    init = tmp_path / "init"
    if method == "sparsedit":
        cli("sparsify", "--checkpoint", run, "--out", init, "--sparse-grid", "2:3", "--pool-depth", 1, "--modules", 1,
            "--sparse-depth", 0, "--dense-depth", 0)  # fmt: skip
        extra = [f"train.distill_from={run}"]
    else:
        cli("adapt", "--checkpoint", run, "--out", init, "--encoder-depth", 1, "--decoder-depth", 1)
        extra = ["stages.1.steps=1"]
    out = tmp_path / "finetuned"
    cli("train", "--config", f"pixart_{method}_finetune", "--out", out, f"data.root={latents}", "data.resolution=16",
        "data.num_workers=0", f"train.init_from={init}", "train.batch_size=2", "train.precision=fp32",
        "train.ckpt_every=2", "train.sample_every=0", "train.log_every=1", "stages.0.steps=2",
        "stages.0.warmup_steps=0", *extra)  # fmt: skip
    model, cfg = load_model(out)
    assert (cfg.objective.kind, cfg.model.adaln, cfg.sample.sampler) == ("ddpm", "single", "dpm-solver++")
    assert model.y_embedder.empty[0].ne(0).all()  # the empty prompt's embedding, from the data or the conversion
    samples = tmp_path / "samples"
    cli("sample", "--checkpoint", out, "--prompt", "a red bag", "--text-encoder-path", t5, "--vae", vae,
        "--steps", 3, "--out", samples, "--no-progress")  # fmt: skip
    (npz,) = samples.glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (1, 16, 16, 3)
