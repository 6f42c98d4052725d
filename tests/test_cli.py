import subprocess
import sys

import numpy as np
import pytest
import torch

from sprintdit.cli import build_parser, main

TINY = [
    "model.preset=SiT-Nano/4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.sample_every=2",
    "stages=[{name: pre, steps: 1, mask_ratio: 0.75}, {name: ft, steps: 1, mask_ratio: 0}]",
    "sample.steps=2",
]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_sample_end_to_end(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_sprint",
        "--out",
        str(run),
        "--no-progress",
        f"data.root={fmnist_dir}",
        *TINY,
    )
    assert code == 0 and "latest checkpoint" in out
    assert (run / "config.yaml").is_file() and (run / "samples" / "step_00000002.png").is_file()
    code, out, _ = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "s"),
        "--labels",
        "0-2",
        "--per-label",
        "2",
        "--guidance",
        "cfg",
        "--scale",
        "1.5",
        "--steps",
        "2",
        "--no-progress",
    )
    assert code == 0
    npz = np.load(tmp_path / "s" / "cfg_euler2_s1.5.npz")
    assert npz["arr_0"].shape == (6, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "s" / "cfg_euler2_s1.5.png").is_file()
    thinned = ["--middle-keep", "0.25:1", "--guidance", "pdg", "--steps", "2", "--labels", "0", "--no-progress"]
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), *thinned)
    assert code == 0 and (tmp_path / "s" / "pdg_euler2_s4_keep0.25-1_varying.npz").is_file(), out
    # resuming a finished run is a no-op that still answers with the checkpoint
    code, out, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress")
    assert code == 0 and "steps 2..2" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--config", "fashion_mnist_sprint", "train.bach_size=3"], "did you mean 'train.batch_size'"),
        (["train", "--config", "fashion_mnist_sprint", "stages.0.mask_ratio=0.3"], "not achievable"),
        (["train", "--config", "fashion_mnist_sprint", "stages.0.mask_ratio=1.0"], "not achievable"),
        (["train", "--config", "no_such_config"], "not found"),
        (["train", "--config", "fashion_mnist_sprint", "data.root=/nonexistent"], "dataset-fashion-mnist"),
        (["train"], "--config"),
        (["sample", "--checkpoint", "/nonexistent/run"], "does not exist"),
        (["sample", "--checkpoint", "FILE"], "corrupt"),
        (["sample", "--checkpoint", "RUN", "--labels", "x"], "--labels must be non-negative integers"),
        (["sample", "--checkpoint", "RUN", "--labels", "12"], "labels must be in [0, 9]"),
        (["sample", "--checkpoint", "RUN", "--per-label", "0"], "--per-label"),
        (["sample", "--checkpoint", "RUN", "--prompt", "a bag"], "class-conditional"),
        (["sample", "--checkpoint", "RUN", "--seeds", "0-3"], "labels but 4 seeds"),
        (["sample", "--checkpoint", "RUN", "--guidance", "cfg", "--interval", "0.5,0.2"], "interval"),
        (["sample", "--checkpoint", "RUN", "--sampler", "dpm-solver++"], "does not fit objective.kind 'flow'"),
        (["sample", "--checkpoint", "RUN", "--timestep-spacing", "karras"], "timestep_spacing 'karras'"),
        (["sample", "--checkpoint", "RUN", "--middle-keep", "0.3"], "not a structured mask of the 8x8 token grid"),
        (["sample", "--checkpoint", "RUN", "--middle-keep", "0"], "keep ratios must be in (0, 1]"),
        (["sample", "--checkpoint", "RUN", "--middle-interval", "1"], "middle interval must be [low, high]"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(fmnist_dir, tmp_path, capsys, argv, message):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    if "RUN" in argv:  # a real tiny run to sample from
        run = tmp_path / "run"
        assert (
            main(
                [
                    "train",
                    "--config",
                    "fashion_mnist_sprint",
                    "--out",
                    str(run),
                    "--no-progress",
                    f"data.root={fmnist_dir}",
                    *TINY,
                    "train.sample_every=0",
                ]
            )
            == 0
        )
        capsys.readouterr()
    argv = [str(bad) if a == "FILE" else str(tmp_path / "run") if a == "RUN" else a for a in argv]
    if argv[0] == "train" and "--config" in argv and not any(a.startswith("data.root") for a in argv):
        argv += [f"data.root={fmnist_dir}"]
    argv += ["--out", str(tmp_path / "out")] if argv[0] == "train" else []
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_exit_code_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sprintdit", "sample", "--checkpoint", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def subcommands() -> dict:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", list(subcommands()))
def test_help_documents_every_option(command, capsys):
    sub = subcommands()[command]
    undocumented = [a.dest for a in sub._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(a.option_strings[-1] in text for a in sub._actions if a.option_strings)


DENSE = [
    "model.preset=SiT-Nano/4",
    "model.sprint.fusion=none",
    "model.sprint.path_drop_prob=0",
    "train.batch_size=4",
    "train.log_every=1",
    "train.sample_every=0",
    "stages=[{name: dense, steps: 2, mask_ratio: 0}]",
    "sample.steps=2",
    "sample.guidance=cfg",
]


def test_sparsify_finetune_sample_end_to_end(fmnist_dir, tmp_path, capsys):
    dense, init, tuned = tmp_path / "dense", tmp_path / "init", tmp_path / "tuned"
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            "fashion_mnist_dense",
            "--out",
            str(dense),
            "--no-progress",
            f"data.root={fmnist_dir}",
            *DENSE,
        )[0]
        == 0
    )
    code, out, _ = run_cli(
        capsys,
        "sparsify",
        "--checkpoint",
        str(dense),
        "--out",
        str(init),
        "--sparse-grid",
        "2:4",
        "--pool-depth",
        "1",
        "--modules",
        "1",
        "--sparse-depth",
        "1",
        "--dense-depth",
        "0",
        "--recover",
        "residual",
    )
    assert code == 0 and "of dense" in out
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_sparsedit",
        "--out",
        str(tuned),
        "--no-progress",
        f"data.root={fmnist_dir}",
        f"train.init_from={init}",
        "train.batch_size=4",
        "stages.0.steps=2",
        "sample.steps=2",
    )
    assert code == 0
    from sprintdit.checkpoint import load_model

    model, cfg = load_model(tuned)
    assert cfg.model.arch == "sparsedit" and cfg.model.sparse.grid == "2:4" and type(model).__name__ == "SparseDiT"
    start, _ = load_model(init)
    # it trained
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    code, _, _ = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(tuned),
        "--out",
        str(tmp_path / "s"),
        "--labels",
        "0-1",
        "--steps",
        "2",
        "--no-progress",
    )
    assert code == 0 and np.load(tmp_path / "s" / "cfg_euler2_s4.npz")["arr_0"].shape == (2, 32, 32, 1)
    # another density schedule at sampling time (tests/test_sparsedit.py checks its outputs): its own file; a grid that
    # does not
    # fit, or a dense model: one line
    code, _, _ = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(tuned),
        "--out",
        str(tmp_path / "s"),
        "--labels",
        "0-1",
        "--steps",
        "2",
        "--no-progress",
        "--sparse-grid",
        "1=2,0.5=3",
    )
    assert code == 0 and np.load(tmp_path / "s" / "cfg_euler2_s4_grid1-2-0.5-3.npz")["arr_0"].shape == (2, 32, 32, 1)
    from sprintdit.sampling_run import SamplingRun

    run = SamplingRun.open(tuned, device="cpu", sparse_grid="1=2,0.5=3")
    assert run.model.sides(torch.tensor([1.0, 0.25])) == [2, 3] and run.config.model.sparse.grid == "1=2,0.5=3"
    for target, grid, message in (
        (tuned, "9", "exceeds the 8x8 token grid"),
        (dense, "2", "applies to SparseDiT checkpoints"),
    ):
        code, _, err = run_cli(
            capsys, "sample", "--checkpoint", str(target), "--out", str(tmp_path / "s"), "--sparse-grid", grid
        )
        assert code == 2 and message in err and err.count("\n") == 1
    # a model section beside init_from, an existing --out: one line each
    code, _, err = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_sparsedit",
        "--out",
        str(tmp_path / "x"),
        f"train.init_from={init}",
        "model.depth=3",
    )
    assert code == 2 and "come from train.init_from" in err
    code, _, err = run_cli(capsys, "sparsify", "--checkpoint", str(dense), "--out", str(init))
    assert code == 2 and "already exists" in err


def test_distillation_from_a_teacher(fmnist_dir, tmp_path, capsys):
    """With weight 1 a student that starts as its teacher has zero loss, hence zero gradient, at every step (the teacher
    sees
    the student's x_t, t and labels); the step's FLOPs add one teacher forward; a teacher of another objective is a
    one-line error."""
    from sprintdit.flops import forward_flops
    from sprintdit.plots import read_metrics

    dense, student = tmp_path / "dense", tmp_path / "student"
    common = ["--no-progress", f"data.root={fmnist_dir}"]
    assert run_cli(capsys, "train", "--config", "fashion_mnist_dense", "--out", str(dense), *common, *DENSE)[0] == 0
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_sparsedit",
        "--out",
        str(student),
        *common,
        f"train.init_from={dense}",
        f"train.distill_from={dense}",
        "train.batch_size=4",
        "train.log_every=1",
        "stages.0.steps=2",
        "sample.steps=2",
    )
    assert code == 0 and "the teacher's" in out
    first, second = [r for r in read_metrics(student) if "loss" in r]
    assert first["loss"] == 0.0 and second["loss"] == 0.0
    from sprintdit.checkpoint import load_model

    _, cfg = load_model(student)
    # forward + backward of the student, forward of the teacher
    assert first["train_flops"] == 4 * forward_flops(cfg.model, 4)
    code, _, err = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_dense",
        "--out",
        str(tmp_path / "x"),
        *common,
        *DENSE,
        "objective.path=cosine",
        f"train.distill_from={dense}",
    )
    assert code == 2 and "teacher's objective.path is linear" in err and len(err.strip().splitlines()) == 1


def test_ddpm_objective_trains_and_samples(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "ddpm"
    code, _, _ = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_dense",
        "--out",
        str(run),
        "--no-progress",
        f"data.root={fmnist_dir}",
        *DENSE,
        "objective.kind=ddpm",
        "model.learn_sigma=true",
        "model.time_scale=1000",
        "sample.sampler=ddpm",
    )
    assert code == 0
    for sampler in ("ddpm", "ddim"):
        code, _, _ = run_cli(
            capsys,
            "sample",
            "--checkpoint",
            str(run),
            "--out",
            str(tmp_path / "s"),
            "--labels",
            "3",
            "--sampler",
            sampler,
            "--steps",
            "3",
            "--no-progress",
        )
        assert code == 0 and (tmp_path / "s" / f"cfg_{sampler}3_s4.npz").is_file()
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--sampler", "euler", "--no-progress"
    )
    assert code == 2 and "does not fit" in err


def test_sample_grid_is_capped_and_train_names_only_what_it_wrote(fmnist_dir, tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        "fashion_mnist_sprint",
        "--out",
        str(run),
        "--no-progress",
        f"data.root={fmnist_dir}",
        *TINY,
        "train.sample_every=0",
        "train.log_every=50",
    )
    # step 1 is logged, no grid was made
    assert code == 0 and "metrics.jsonl" in out and "samples" not in out.replace(str(run), "")
    args = [
        "sample",
        "--checkpoint",
        str(run),
        "--labels",
        "0-4",
        "--per-label",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--guidance",
        "cfg",
    ]
    code, out, _ = run_cli(capsys, *args, "--out", str(tmp_path / "s"), "--grid-max", "5")
    assert code == 0 and "(first 4)" in out
    assert Image.open(tmp_path / "s" / "cfg_euler2_s4.png").size == (
        2 * 34 + 2,
        2 * 34 + 2,
    )  # 2 rows of 2 (32 px + 2 px padding)
    assert np.load(tmp_path / "s" / "cfg_euler2_s4.npz")["arr_0"].shape[0] == 10  # the batch keeps every sample
    code, out, _ = run_cli(capsys, *args, "--out", str(tmp_path / "t"), "--grid-max", "0")
    assert code == 0 and "no grid" in out and not list((tmp_path / "t").glob("*.png"))


def test_sprint_adapter_leaves_a_dense_model_unchanged_then_finetunes_token_sparse(fmnist_dir, tmp_path, capsys):
    """adapt: SPRINT's fusion added to a dense model as [I, 0], so at mask 0 it is the source; the two-stage
    fine-tune (masked, then dense) runs through the normal trainer, and Path-Drop Guidance samples afterwards."""
    from sprintdit.checkpoint import load_model

    dense, init, tuned = tmp_path / "dense", tmp_path / "init", tmp_path / "tuned"
    argv = ["--no-progress", f"data.root={fmnist_dir}"]
    assert run_cli(capsys, "train", "--config", "fashion_mnist_dense", "--out", str(dense), *argv, *DENSE)[0] == 0
    code, out, err = run_cli(capsys, "adapt", "--checkpoint", str(dense), "--out", str(init), "--encoder-depth", "1",
                             "--decoder-depth", "1")  # fmt: skip
    assert code == 0 and "fusion [I, 0]" in out, err
    source, _ = load_model(dense)
    adapted, cfg = load_model(init)
    assert (cfg.model.sprint.fusion, cfg.model.sprint.encoder_depth, cfg.model.middle_depth) == ("concat_linear", 1, 2)
    x, t, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(adapted(x, t, y), source(x, t, y))  # exactly the source at mask 0
    steps = ["train.batch_size=4", "stages.0.steps=2", "stages.1.steps=1"]
    code, _, err = run_cli(capsys, "train", "--config", "fashion_mnist_sprint_finetune", "--out", str(tuned), *argv,
                           f"train.init_from={init}", *steps)  # fmt: skip
    assert code == 0, err
    model, cfg = load_model(tuned)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), adapted.state_dict().values()))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tuned), "--out", str(tmp_path / "s"), "--labels",
                           "0-1", "--steps", "2", "--guidance", "pdg", "--no-progress")  # fmt: skip
    assert code == 0 and np.load(tmp_path / "s" / "pdg_euler2_s2.npz")["arr_0"].shape == (2, 32, 32, 1), err
    code, _, err = run_cli(capsys, "adapt", "--checkpoint", str(tuned), "--out", str(tmp_path / "again"))
    assert code == 2 and "is not a dense DiT/SiT" in err  # a SPRINT model is not adapted twice
