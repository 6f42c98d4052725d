"""Hugging Face interop, offline: diffusers' DiTTransformer2DModel in and out (numerically against diffusers on
tiny random models), and the Hub-style export that Pipeline.from_pretrained loads."""

import json

import pytest
import torch
from safetensors.torch import save_file

import sprintdit
from sprintdit import checkpoint as ckpt
from sprintdit.cli import main
from sprintdit.convert import ConvertOptions, convert, write_run
from sprintdit.errors import UserError
from sprintdit.export import export

diffusers = pytest.importorskip("diffusers")
ATOL = 1e-5  # float32 attention and LayerNorm computed in another order
EPS_ATOL = 1e-4  # at diffusers' default norm_eps 1e-5 its final LayerNorm alone keeps 1e-6 (ours uses one eps)


def random_dit(tmp_path, **overrides):
    """A tiny DiTTransformer2DModel folder with every tensor random, embedders shared across blocks as in the
    releases."""
    torch.manual_seed(0)
    kwargs = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    model = diffusers.DiTTransformer2DModel(**{**kwargs, **overrides}).eval()
    state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    for key in list(state):  # one timestep and class embedder, copied into every block
        if ".norm1.emb." in key:
            state[key] = state["transformer_blocks.0." + key.split(".", 2)[2]]
    model.load_state_dict(state)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    return model, folder


def outputs(ours, theirs, cfg, batch=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g)
    k = torch.tensor([0, 417, 999])  # DDPM steps; ours sees t = k / T times time_scale T
    y = torch.tensor([1, 10, 7])  # 10: the null class
    with torch.no_grad():
        a = ours(x, k.double() / 1000, y)
        b = theirs(x, timestep=k, class_labels=y).sample
    return a, b


@pytest.mark.parametrize("eps,atol", [(1e-6, ATOL), (1e-5, EPS_ATOL)])
def test_diffusers_dit_converts_to_the_same_network(tmp_path, eps, atol):
    theirs, folder = random_dit(tmp_path, norm_eps=eps)
    converted = convert(folder, ConvertOptions("diffusers"))
    cfg = converted.model
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.time_freq_shift, cfg.learn_sigma) == (3, 16, 2, 1, True)
    run = write_run(tmp_path / "run", converted, "diffusers")
    model, run_cfg = ckpt.load_model(run)
    assert run_cfg.objective.kind == "ddpm" and run_cfg.sample.sampler == "ddpm"
    a, b = outputs(model, theirs, cfg)
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_export_to_diffusers_round_trips(tmp_path, capsys):
    theirs, folder = random_dit(tmp_path, norm_eps=1e-6)
    write_run(tmp_path / "run", convert(folder, ConvertOptions("diffusers")), "diffusers")
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "exported"),
                "--format",
                "diffusers",
            ]
        )
        == 0
    )
    again = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    original = dict(theirs.state_dict())
    for key, value in again.state_dict().items():
        assert torch.equal(value, original[key]), key
    model, _ = ckpt.load_model(tmp_path / "run")
    a, b = outputs(model, again, model.config)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_per_block_embedders_and_unexportable_models_are_refused(tmp_path, fmnist_dir):
    theirs, folder = random_dit(tmp_path)
    state = theirs.state_dict()
    state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="block 1 has its own"):
        convert(folder, ConvertOptions("diffusers"))
    cfg = sprintdit.load_config(
        "fashion_mnist_sprint",
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "train.batch_size=4",
            "train.sample_every=0",
            "stages=[{name: pre, steps: 1, mask_ratio: 0.75}]",
        ],
    )
    sprintdit.train(cfg, out=tmp_path / "sprint", progress=False)
    with pytest.raises(UserError, match="fusion is 'concat_linear'.*pos_embed is 'rope'"):
        export(tmp_path / "sprint", tmp_path / "no", "diffusers")
    assert not (tmp_path / "no").exists()


def test_hub_export_loads_in_the_pipeline_with_its_card(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = sprintdit.load_config(
        "fashion_mnist_sprint",
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "train.batch_size=4",
            "train.sample_every=0",
            "stages=[{name: pre, steps: 2, mask_ratio: 0.75}]",
        ],
    )
    sprintdit.train(cfg, out=run, progress=False)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--num-samples",
                "10",
                "--steps",
                "2",
                "--no-progress",
                "--data-root",
                str(fmnist_dir),
            ]
        )
        == 0
    )
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hub")]) == 0
    files = sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "hub" / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: sprintdit")
        and "| pre | 2 | 0.75 (structured)" in card
        and "eval_pdg_euler2_s4_n10.json" in card
    )
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["run"]["model"]["preset"] == "SiT-Nano/4"
    exported = sprintdit.Pipeline.from_pretrained(tmp_path / "hub", device="cpu")(labels=[1, 2], seeds=[3, 4], steps=2)
    original = sprintdit.Pipeline.from_pretrained(run, device="cpu")(labels=[1, 2], seeds=[3, 4], steps=2)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(exported, original))
    # never over an existing folder
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hub")]) == 2
