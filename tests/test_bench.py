import json

import pytest
from conftest import DENSE

from sprintdit.bench import BenchConfig, run_bench
from sprintdit.cli import main
from sprintdit.flops import forward_flops
from sprintdit.models import SiT
from sprintdit.models.sit import ModelConfig

SMALL = [
    "--preset",
    "SiT-Nano/4",
    "--resolution",
    "32",
    "--latent-factor",
    "1",
    "--channels",
    "1",
    "--num-classes",
    "10",
    "--batch",
    "4",
    "--warmup",
    "0",
    "--repeats",
    "2",
    "--sample-steps",
    "2",
    "--peak-tflops",
    "1.0",
]


def test_bench_reports_every_ratio_with_analytic_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--mask-ratios", "0,0.75", "--out", str(out)]) == 0
    assert "PDG" in capsys.readouterr().out
    report = json.loads(out.read_text())
    model_cfg = SiT(ModelConfig(preset="SiT-Nano/4", input_size=[32, 32], in_channels=1, num_classes=10)).config
    assert [r["mask_ratio"] for r in report["train"]] == [0.0, 0.75]
    for r in report["train"]:
        assert r["flops_per_step"] == 3 * forward_flops(model_cfg, 4, r["mask_ratio"])
        assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0) and r["peak_memory_gib"] is None
    assert report["train"][0]["speedup_vs_dense"] == 1.0
    sample = report["sample"]
    assert sample["pdg"]["flops_per_step"] == forward_flops(model_cfg, 8, middle_rows=4)
    assert sample["pdg_speedup_vs_cfg"] == pytest.approx(sample["cfg"]["step_ms"] / sample["pdg"]["step_ms"])
    assert report["config"]["precision"] == "fp32"  # auto on CPU


def test_bench_measures_a_peak_when_none_is_given():
    cfg = BenchConfig(
        preset="SiT-Nano/8",
        resolution=16,
        latent_factor=1,
        channels=1,
        num_classes=2,
        batch=2,
        mask_ratios=[0.0],
        warmup=0,
        repeats=1,
        sample_steps=1,
    )
    report = run_bench(cfg, __import__("torch").device("cpu"))
    assert report["peak_tflops"] > 0 and 0 < report["train"][0]["mfu"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mask-ratios", "0,0.3"], "not achievable"),
        (["--mask-ratios", "a"], "--mask-ratios"),
        (["--resolution", "30"], "multiple of"),
        (["--precision", "fp8"], "--precision"),
        (["--compile-mode", "reduce-overhead"], "give it with --compile"),  # without --compile it would do nothing
        (["--compile", "--compile-mode", "fast"], "--compile-mode 'fast'"),
    ],
)
def test_bench_bad_input_is_one_line(argv, message, capsys):
    args = SMALL.copy()
    if "--resolution" in argv:
        args[args.index("--resolution") + 1] = argv[1]
        args[args.index("--latent-factor") + 1] = "4"
        argv = []
    assert main(["bench", *args, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_compares_sparsedit_with_its_dense_source(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        *SMALL,
        "--mask-ratios",
        "0",
        "--sparse-grids",
        "2:4 8",
        "--sparse-layout",
        "1,1,1,0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["sparsedit"]
    assert [r["grid"] for r in rows] == ["dense", "2:4", "8"]
    dense_cfg = SiT(
        ModelConfig(preset="SiT-Nano/4", input_size=[32, 32], in_channels=1, num_classes=10, sprint=DENSE)
    ).config
    # 2 CFG steps of 2 x 4
    assert rows[0]["gflops_per_image"] * 4 * 1e9 == pytest.approx(2 * forward_flops(dense_cfg, 2 * 4))
    assert rows[1]["flops_vs_dense"] < rows[2]["flops_vs_dense"] < 1.0 and rows[0]["speedup_vs_dense"] == 1.0


def test_bench_times_video_models_with_frame_aware_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", *SMALL, "--frames", "4", "--patch-size-t", "2", "--mask-ratios", "0,0.75", "--out", str(out)])
        == 0
    )
    assert "4-frame clips" in capsys.readouterr().out
    report = json.loads(out.read_text())
    video = SiT(
        ModelConfig(preset="SiT-Nano/4", input_size=[4, 32, 32], patch_size_t=2, in_channels=1, num_classes=10)
    ).config
    assert video.grid == (2, 8, 8)
    assert [r["flops_per_step"] for r in report["train"]] == [
        3 * forward_flops(video, 4, ratio) for ratio in (0.0, 0.75)
    ]


def test_bench_times_the_factorised_video_layout(tmp_path, capsys):
    """Latte's layout: one frame per token, the middle's mask tiled over the frames; FLOPs as the model counts."""
    out = tmp_path / "bench.json"
    argv = ["bench", *SMALL, "--frames", "4", "--video-layout", "factorised", "--mask-ratios", "0,0.75", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert "4-frame clips (factorised" in capsys.readouterr().out
    factorised = SiT(
        ModelConfig(
            preset="SiT-Nano/4",
            input_size=[4, 32, 32],
            in_channels=1,
            num_classes=10,
            pos_embed="sincos",
            video_layout="factorised",
        )  # fmt: skip
    ).config
    report = json.loads(out.read_text())
    assert [r["flops_per_step"] for r in report["train"]] == [
        3 * forward_flops(factorised, 4, ratio) for ratio in (0.0, 0.75)
    ]


def test_bench_times_an_imported_pixarts_architecture(tmp_path, capsys):
    """--model-from a converted PixArt: its captions (random T5-width rows) and adaLN-single are timed, dense against
    SparseDiT, with FLOPs from the same analytic model as its own run's."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from sprintdit.convert import ConvertOptions, convert, write_run

    torch.manual_seed(0)
    config = dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=6,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
    )  # fmt: skip
    diffusers.PixArtTransformer2DModel(**config).save_pretrained(tmp_path / "transformer")
    run = tmp_path / "run"
    converted = convert(tmp_path / "transformer", ConvertOptions("diffusers"))
    write_run(run, converted, "diffusers")
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-from", run, "--batch", 2, "--mask-ratios", "0,0.75", "--sparse-grids", "2:3",
            "--sparse-layout", "1,1,1,0", "--sample-steps", 2,
            "--warmup", 0, "--repeats", 1, "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    report = json.loads(out.read_text())
    assert "the architecture of" in capsys.readouterr().out
    rows = report["sparsedit"]
    assert [r["grid"] for r in rows] == ["dense", "2:3"] and rows[1]["flops_vs_dense"] < 1.0
    # 2 CFG steps of 2 x 2, the converted (dense) network's count
    assert rows[0]["gflops_per_image"] * 2 * 1e9 == pytest.approx(2 * forward_flops(converted.model, 2 * 2))
    assert len(report["train"]) == 2


def test_bench_times_sprints_thinned_middle(tmp_path, capsys):
    """SiT-Mini/8 at 32 px: a 4 x 4 token grid and a middle of 8 blocks (Nano's 4 blocks leave none)."""
    out = tmp_path / "bench.json"
    args = [a if a != "SiT-Nano/4" else "SiT-Mini/8" for a in SMALL]
    assert main(["bench", *args, "--mask-ratios", "0", "--middle-keeps", "0.25 0.25:1", "--out", str(out)]) == 0
    assert "middle thinned" in capsys.readouterr().out
    rows = json.loads(out.read_text())["middle_keep"]
    assert [(r["guidance"], r["middle_keep"]) for r in rows] == [
        (g, k) for g in ("cfg", "pdg") for k in ("1", "0.25", "0.25:1")
    ]
    model_cfg = SiT(ModelConfig(preset="SiT-Mini/8", input_size=[32, 32], in_channels=1, num_classes=10)).config
    # 2 Euler steps of 2 x 1 samples per image; keep 0.25 drops 0.75 of the middle's tokens at both
    assert rows[1]["gflops_per_image"] * 1e9 == pytest.approx(2 * forward_flops(model_cfg, 2, 0.75))
    by = {(r["guidance"], r["middle_keep"]): r["flops_vs_dense_cfg"] for r in rows}
    assert by[("pdg", "0.25")] < by[("pdg", "1")] < 1.0 and by[("cfg", "0.25")] < by[("cfg", "0.25:1")] < 1.0
