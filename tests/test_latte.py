"""Latte's text-to-video transformer: diffusers' LatteTransformer3DModel, built from small random configs, imported
into sprintdit's backbone on the factorised video layout must compute the same outputs (several frame counts, padded
captions), export back to the same tensors, and be counted right by the FLOPs model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_flops import counted

from sprintdit.convert import ConvertOptions, convert, export_diffusers
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops
from sprintdit.models import SiT

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
    caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single", activation_fn="gelu-approximate",
    attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
)  # fmt: skip
TOKENS = 5  # caption length of the test embeddings


def latte(tmp_path, **changes):
    """A random LatteTransformer3DModel in float64, saved as a diffusers folder."""
    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(**{**CONFIG, **changes}).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero inits, so every tensor matters
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_imported_latte_equals_diffusers(tmp_path, frames):
    """Frame counts 1 (no temporal table: a lone frame's time block attends to itself), 4 and 8 (diffusers runs a
    clip of exactly video_length frames). Captions as LattePipeline gives them: zero padding rows, no mask (every
    row a key)."""
    theirs, folder = latte(tmp_path, video_length=frames)
    converted = convert(folder, ConvertOptions("diffusers"))
    cfg = converted.model
    assert (cfg.video_layout, cfg.depth, cfg.input_size, cfg.adaln) == ("factorised", 4, [frames, 8, 8], "single")
    ours = SiT(cfg).double().eval()
    ours.load_state_dict(converted.weights)
    x = torch.randn(2, 4, frames, 8, 8, dtype=torch.float64)
    steps = torch.tensor([3, 900])
    emb = torch.randn(2, TOKENS, CONFIG["caption_channels"], dtype=torch.float64)
    mask = torch.arange(TOKENS)[None] < torch.tensor([[5], [2]])  # (B, L)
    emb = emb * mask[..., None]
    padded = torch.nn.functional.pad(emb, (0, 0, 0, cfg.text.max_tokens - TOKENS))  # 120 rows, as the pipeline's
    with torch.no_grad():
        want = theirs(x, timestep=steps, encoder_hidden_states=padded).sample
        got = ours(x, steps.double() / 1000, padded)
    assert want.shape == got.shape == (2, 8, frames, 8, 8)
    # float64 throughout but for diffusers' sinusoids (timestep frequencies, positions), made in float32
    torch.testing.assert_close(got, want, rtol=0, atol=5e-7)  # max seen 3.0e-7 (8 frames)


def test_latte_export_round_trips_and_loads_in_diffusers(tmp_path):
    theirs, folder = latte(tmp_path, video_length=4)
    converted = convert(folder, ConvertOptions("diffusers"))
    tensors, config = export_diffusers(converted.weights, converted.model)
    again = diffusers.LatteTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    again.load_state_dict(tensors)  # strict: the same names and shapes
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(tensors[name].double(), value, rtol=0, atol=1e-7)  # float32 copies
    assert config["_class_name"] == "LatteTransformer3DModel" and config["num_layers"] == 2


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"activation_fn": "geglu"}, "activation_fn 'geglu'"),
        ({"norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1000}, "norm_type 'ada_norm_zero'"),
        ({"attention_bias": False}, "attention_bias False"),
    ],
)
def test_unsupported_latte_variants_are_refused_in_one_line(tmp_path, changes, message):
    _, folder = latte(tmp_path, **changes)
    with pytest.raises(UserError) as err:
        convert(folder, ConvertOptions("diffusers"))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("frames", [4, 2])
def test_factorised_layout_flops_match_torch_counter(tmp_path, frames):
    """Space blocks attend over a frame's tokens (B F sequences), time blocks over the frames (B N/F sequences): the
    analytic count equals torch's, for the model's clip length and a shorter clip."""
    _, folder = latte(tmp_path, video_length=4)
    cfg = convert(folder, ConvertOptions("diffusers")).model
    model = SiT(cfg).eval()
    x, t = torch.randn(2, 4, frames, 8, 8), torch.rand(2)
    emb = torch.randn(2, cfg.text.max_tokens, CONFIG["caption_channels"])
    expected = forward_flops(cfg, 2) if frames == cfg.input_size[0] else None
    got = counted(model, x, t, emb)
    if expected is not None:
        assert got == expected
    joint = SiT(replace(cfg, video_layout="joint", pos_base=None)).eval()  # one attention over all F N/F tokens
    assert got < counted(joint, x, t, emb)


def test_sprint_on_the_factorised_layout_keeps_whole_time_sequences_and_counts_right():
    """SPRINT's middle on Latte's layout: the mask keeps the same positions in every frame (a time block's sequences
    stay whole, and a space block sees equal frames), every token is restored, the masked forward's FLOPs (and the
    Path-Drop Guidance half's) equal torch's count."""
    from sprintdit.masking import make_mask
    from sprintdit.sections import ModelConfig, SprintConfig

    cfg = ModelConfig(
        input_size=[4, 8, 8], in_channels=4, patch_size=2, hidden_size=32, depth=6, num_heads=2, num_classes=3,
        pos_embed="sincos", video_layout="factorised", sprint=SprintConfig(encoder_depth=2, decoder_depth=2),
    )  # fmt: skip
    model = SiT(cfg).eval()
    grid, tiles = model.config.mask_grid()
    assert (grid, tiles) == ((4, 4), 4)
    mask = make_mask(2, grid, 0.75, "structured", torch.Generator().manual_seed(0), tiles)
    kept = mask.ids_keep.view(2, 4, -1)  # (B, F, K/F): frame-major, the same count per frame
    assert torch.equal(kept - kept[:, :1], torch.arange(4)[None, :, None].expand_as(kept) * 16)  # same positions
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        out = model(x, t, y, mask=mask)
        assert torch.isfinite(out).all() and out.shape == (2, 4, 4, 8, 8)
    assert counted(model, x, t, y, mask=mask) == forward_flops(model.config, 2, mask_ratio=0.75)
    assert counted(model, x, t, y, middle_rows=1) == forward_flops(model.config, 2, middle_rows=1)
    assert counted(model, x, t, y) == forward_flops(model.config, 2)


def test_sparsedit_of_a_converted_latte_pools_each_frame_and_counts_right(tmp_path):
    """SparseDiT on Latte: Poolingformers, and modules whose merge / recover are space blocks (each frame pooled to
    the schedule's side, cross-attended within the frame), time blocks on the sparse tokens; cross-attention to the
    caption kept; outputs finite and FLOPs equal torch's at every side; a layout that would put merge on a time
    block is refused in one line."""
    from sprintdit.checkpoint import load_model
    from sprintdit.convert import write_run
    from sprintdit.density import SparseConfig
    from sprintdit.sparsify import sparsify

    _, folder = latte(tmp_path, num_layers=6, video_length=4)  # 12 blocks
    write_run(tmp_path / "run", convert(folder, ConvertOptions("diffusers")), "diffusers")
    layout = SparseConfig(grid="2:4", pool_depth=2, modules=1, sparse_depth=3, dense_depth=1)
    sparsify(tmp_path / "run", tmp_path / "sparse", layout)
    model, run = load_model(tmp_path / "sparse")
    axes = [b.axis for b in model.blocks]
    assert type(model).__name__ == "SparseDiT" and axes[2] == axes[6] == "space" and axes[3] == "time"
    x, t = torch.randn(2, 4, 4, 8, 8), torch.full((2,), 0.5)
    emb = torch.randn(2, run.model.text.max_tokens, CONFIG["caption_channels"])
    for side in (2, 3, 4):
        with torch.no_grad():
            assert torch.isfinite(model(x, t, emb, side=side)).all()
        assert counted(model, x, t, emb, side=side) == forward_flops(run.model, 2, side=side)
    odd = SparseConfig(grid="2:4", pool_depth=1, modules=1, sparse_depth=3, dense_depth=1)
    with pytest.raises(UserError, match="merge and recover blocks must be space blocks"):
        sparsify(tmp_path / "run", tmp_path / "odd", odd)


def test_sprintdit_samples_a_converted_latte_as_lattepipeline_does(tmp_path):
    """LattePipeline from tiny random parts (Latte transformer, T5 with a word-level tokenizer, AutoencoderKL) and
    sprintdit's sampler on the converted run: two prompts (LattePipeline keeps 120 caption rows for a batch, padding
    zeroed; for one prompt it cuts them to the prompt's length instead), the empty negative prompt unmasked as the
    unconditional caption, DPM-Solver++ 20 steps, CFG 4.5, the same starting latents: the same latents, and the same
    frames through the VAE."""
    from conftest import tiny_vae
    from test_captions import T5_DIM, tiny_encoder_folder
    from test_pixart import LATENT_SCALE, PIXART_SCHEDULER

    from sprintdit.api import sample_conditions
    from sprintdit.convert import write_run
    from sprintdit.sampling import SampleNoise, generate
    from sprintdit.sampling_run import SamplingRun

    transformers = pytest.importorskip("transformers")
    _, folder = latte(tmp_path, caption_channels=T5_DIM, video_length=3)
    t5, vae = tiny_encoder_folder(tmp_path / "t5", "t5"), tiny_vae(tmp_path / "vae", 16, scaling_factor=LATENT_SCALE)
    pipe = diffusers.LattePipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(t5),
        text_encoder=transformers.T5EncoderModel.from_pretrained(t5),
        vae=diffusers.AutoencoderKL.from_pretrained(vae),
        transformer=diffusers.LatteTransformer3DModel.from_pretrained(folder),
        scheduler=diffusers.DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    write_run(tmp_path / "run", convert(folder, ConvertOptions("diffusers")), "diffusers")
    run = SamplingRun.open(tmp_path / "run", device="cpu", vae=str(vae))
    prompts, seeds = ["a red bag on the left", "blue shoe"], [5, 9]
    conditions = sample_conditions(run.config.model, prompts=prompts, text_encoder_path=str(t5), network=run.model)
    ours = generate(run.model, run.objective, conditions, seeds, run.sample_config(), "cpu")  # (2, 4, 3, 8, 8)
    start = SampleNoise(seeds, "cpu").randn((4, 3, 8, 8))
    call = dict(
        prompt=prompts, negative_prompt="", latents=start, num_inference_steps=20, guidance_scale=4.5, video_length=3,
        height=16, width=16, clean_caption=False,
    )  # fmt: skip
    with torch.no_grad():
        theirs = pipe(**call, output_type="latent").frames
        video = pipe(**call, output_type="pt").frames  # (2, F, 3, 16, 16) in [0, 1]
    assert (ours - start).abs().max() > 0.5  # it sampled
    assert (ours - theirs).abs().max() < 1e-6 * theirs.abs().max()  # float32 both; our schedule in float64
    frames = ((run.to_pixels(ours) + 1) / 2).clamp(0, 1).transpose(1, 2)  # (2, F, 3, 16, 16)
    assert 0.05 < video.mean() < 0.95 and video.std() > 0.01  # not saturated
    torch.testing.assert_close(frames, video, rtol=0, atol=1e-5)
    assert run.model.y_embedder.empty[1:].ne(0).any()  # the negative prompt's padding rows, unmasked as diffusers'


def write_clips(root, names, frames: int, side: int = 16):
    """Random RGB clips (F, side, side, 3) uint8 as .npy files at `names` (paths relative to root)."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / name, rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "config", ["latte_t2v_sparsedit_finetune", "latte_t2v_sprint_finetune", "latte_class_sparsedit_finetune"]
)
def test_shipped_latte_finetunes_run_end_to_end_on_video_latents(tmp_path, capsys, config):
    """The README's commands on tiny parts: clips (captioned, or in class folders) prepared into per-frame VAE latents
    (C, F, h, w) with T5 caption rows, a converted Latte (diffusers' text-to-video, or the release's class-conditional
    layout) sparsified (or SPRINT-adapted), fine-tuned with the shipped config (SparseDiT: distilled from the dense
    model), then sampled through the VAE: whole clips of the model's frames."""
    from conftest import tiny_vae
    from test_captions import T5_DIM, tiny_encoder_folder
    from test_convert import CHANNELS, CLASSES, FRAMES, latte_layout

    from sprintdit.checkpoint import load_model
    from sprintdit.cli import main

    def cli(*argv) -> None:
        code = main([str(a) for a in argv])
        assert code == 0, capsys.readouterr().err

    text = "_t2v_" in config
    root, latents, run, init, out = (tmp_path / name for name in ("clips", "latents", "run", "init", "out"))
    if text:
        frames, channels = 3, 4
        t5 = tiny_encoder_folder(tmp_path / "t5", "t5")
        _, folder = latte(tmp_path, caption_channels=T5_DIM, video_length=frames)
        cli("convert", "--from", "diffusers", "--checkpoint", folder, "--out", run, "--text-encoder-path", t5)
        write_clips(root, ["a/0.npy", "a/1.npy", "b/2.npy"], frames)
        lines = [{"file": "a/0.npy", "caption": "a red bag"}, {"file": "b/2.npy", "caption": "blue shoe"}]
        (tmp_path / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        extra = ["--captions", tmp_path / "captions.jsonl", "--text-encoder", "t5", "--text-encoder-path", t5]
        cli("prepare", "--images", root, "--clips", *extra, "--max-tokens", 120, "--vae",
            tiny_vae(tmp_path / "vae", 16), "--resolution", 16, "--out", latents)  # fmt: skip
        manifest = json.loads((latents / "manifest.json").read_text())
        assert manifest["count"] == 2 and manifest["latent_shape"] == [channels, frames, 8, 8]  # captioned clips only
        condition = ["--prompt", "a red bag", "--text-encoder-path", t5]
    else:
        frames, channels = FRAMES, CHANNELS
        torch.save(latte_layout(depth=4), tmp_path / "latte.pt")
        cli("convert", "--from", "latte", "--checkpoint", tmp_path / "latte.pt", "--out", run)
        write_clips(root, [f"c{k}/{k}.npy" for k in range(CLASSES)], frames)  # the checkpoint's classes
        cli("prepare", "--images", root, "--clips", "--vae", tiny_vae(tmp_path / "vae", 16, latent_channels=channels),
            "--resolution", 16, "--out", latents)  # fmt: skip
        condition = ["--labels", 1]
        write_clips(tmp_path / "short", [f"c{k}/{k}.npy" for k in range(CLASSES)], frames - 2)
        cli("prepare", "--images", tmp_path / "short", "--clips", "--vae", tmp_path / "vae", "--resolution", 16,
            "--out", tmp_path / "short_latents")  # fmt: skip
        code = main(["train", "--config", config, "--out", str(out), f"data.root={tmp_path / 'short_latents'}",
                     f"train.init_from={run}", "data.resolution=16"])  # fmt: skip
        err = capsys.readouterr().err
        assert (
            code == 2
            and "model.input_size is [4, 8, 8] but the data has [2, 8, 8]; the model of train.init_from" in err
        )
        assert not out.exists()  # nothing written
    if "sprint" in config:
        cli("adapt", "--checkpoint", run, "--out", init, "--encoder-depth", 1, "--decoder-depth", 1)
        extra = ["stages.1.steps=1"]
    else:
        cli("sparsify", "--checkpoint", run, "--out", init, "--sparse-grid", "2:3", "--pool-depth", 0, "--modules", 1,
            "--sparse-depth", 1, "--dense-depth", 1)  # fmt: skip
        extra = [f"train.distill_from={run}"]
    cli("train", "--config", config, "--out", out, f"data.root={latents}", "data.resolution=16", "data.num_workers=0",
        f"train.init_from={init}", "train.batch_size=2", "train.precision=fp32", "train.ckpt_every=2",
        "train.sample_every=0", "train.log_every=1", "stages.0.steps=2", "stages.0.warmup_steps=0", *extra)  # fmt: skip
    model, cfg = load_model(out)
    assert (cfg.objective.kind, cfg.model.video_layout, cfg.model.input_size[0]) == ("ddpm", "factorised", frames)
    assert (cfg.model.arch == "sparsedit") == ("sparsedit" in config)
    samples = tmp_path / "samples"
    cli("sample", "--checkpoint", out, *condition, "--vae", tmp_path / "vae", "--steps", 3, "--out", samples,
        "--no-progress")  # fmt: skip
    (npz,) = samples.glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (1, frames, 16, 16, 3)


def test_lattes_own_text_to_video_checkpoint_converts_as_its_diffusers_folder(tmp_path, capsys):
    """Vchitect/Latte's models/latte_t2v.py checkpoint (a .pt of diffusers' key names, without the frames, latent side
    or head count): with --input-size F,H,W and --num-heads it gives exactly the tensors of the diffusers folder;
    what cannot be Latte's is refused in one line."""
    from sprintdit.cli import main

    model, folder = latte(tmp_path, video_length=3)
    state = model.state_dict()
    torch.save({"ema": state}, tmp_path / "t2v.pt")
    ours = convert(tmp_path / "t2v.pt", ConvertOptions("latte", input_size=[3, 8, 8], num_heads=2))
    reference = convert(folder, ConvertOptions("diffusers"))
    assert ours.model == reference.model and ours.weights.keys() == reference.weights.keys()
    for key, value in reference.weights.items():
        assert torch.equal(ours.weights[key], value), key
    assert main(["convert", "--from", "latte", "--checkpoint", str(tmp_path / "t2v.pt"), "--out", str(tmp_path / "r"),
                 "--input-size", "3,8,8", "--num-heads", "2"]) == 0  # fmt: skip
    assert "Latte text-to-video: 3 frames of 8x8 latents" in capsys.readouterr().out
    with pytest.raises(UserError, match="width 16 does not split into 0 attention heads: give --num-heads"):
        convert(tmp_path / "t2v.pt", ConvertOptions("latte", input_size=[3, 8, 8]))
    broken = {k: v for k, v in state.items() if not k.startswith("temporal_transformer_blocks.1.")}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="2 spatial but 1 temporal blocks"):
        convert(tmp_path / "broken.pt", ConvertOptions("latte", input_size=[3, 8, 8], num_heads=2))
    geglu, _ = latte(tmp_path / "geglu", activation_fn="geglu")
    torch.save(geglu.state_dict(), tmp_path / "geglu.pt")
    with pytest.raises(UserError, match="activation_fn 'geglu'"):
        convert(tmp_path / "geglu.pt", ConvertOptions("latte", input_size=[3, 8, 8], num_heads=2))
