import json
import os
import shutil
import signal
import textwrap

import pytest

from sprintdit.cli import main
from sprintdit.config import load_config
from sprintdit.errors import UserError
from sprintdit.flops import train_step_flops
from sprintdit.plots import read_metrics
from sprintdit.config import find_config
from sprintdit.study import STUDY_DIR, Study, eval_every, load_study, run_study, stage_steps_for_budget, with_steps
from sprintdit.training import Trainer
from sprintdit.training.resolve import resolve_run_config
from sprintdit.data import build_dataset

TINY = [
    "model.preset=SiT-Nano/4",
    "model.hidden_size=32",
    "model.depth=6",
    "train.batch_size=4",
    "train.log_every=1",
    "stages=[{name: pre, steps: 3, lr: 0.001, warmup_steps: 1, mask_ratio: 0.75}, {name: ft, steps: 1, lr: 0.001, "
    "mask_ratio: 0}]",
]


def study_file(tmp_path, fmnist_dir, body: str = "") -> str:
    """A two-run study (dense against SPRINT) of a tiny model with a 2-step budget."""
    overrides = [f"data.root={fmnist_dir}", *TINY]
    text = textwrap.dedent(f"""
        description: tiny dense vs SPRINT
        base: fashion_mnist_sprint
        overrides: {json.dumps(overrides)}
        budget: {{kind: steps, value: 2}}
        evaluation: {{num_samples: 10, steps: 2, points: 3, grid_columns: 2}}
        runs:
          - name: dense
            overrides: [model.sprint.fusion=none, model.sprint.path_drop_prob=0, stages.0.mask_ratio=0]
            split: [0.5, 0.5]
          - name: sprint
            split: [0.5, 0.5]
            sweep: [{{name: pdg, guidance: pdg, scale: 2.0}}]
        claims:
          - {{text: SPRINT beats dense, a: sprint, b: dense}}
        sizes:
          cpu: {{}}
          gpu: {{budget: {{kind: steps, value: 4}}}}
    """) + textwrap.dedent(body)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def test_two_run_study_runs_resumes_and_skips(fmnist_dir, tmp_path, monkeypatch):
    path, out = study_file(tmp_path, fmnist_dir), tmp_path / "study"
    calls = {"n": 0}
    real_step = Trainer.train_step

    def interrupted_step(self, *args):  # Ctrl-C during the second run's first step: it finishes, then the run saves
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(UserError, match="SIGINT at step 1: saved"):
        run_study(path, out=out, seeds=1, progress=False)
    assert (out / "runs" / "dense" / "seed0" / "study_result.json").is_file()
    assert not (out / "runs" / "sprint" / "seed0" / "study_result.json").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    lines = []
    data = run_study(path, out=out, seeds=1, progress=False, log=lines.append)
    assert "dense seed 0: finished earlier, skipped" in lines[0] and "1 pre + 1 ft steps" in lines[1]
    rows = data["rows"]
    assert list(rows) == ["dense", "sprint", "sprint/pdg"]
    assert all(r["values"]["steps"] == [2] for r in rows.values())
    assert rows["sprint"]["mean"]["train_tflops"] < rows["dense"]["mean"]["train_tflops"]  # a masked step is cheaper
    # guidance costs a second pass
    assert rows["sprint/pdg"]["mean"]["sample_gflops"] > rows["sprint"]["mean"]["sample_gflops"]
    curve = [r for r in read_metrics(out / "runs" / "sprint" / "seed0") if "eval_samples" in r]
    # at most 3 points, the last at the end
    assert [r["step"] for r in curve] == [1, 2] and all(r["train_seconds"] > 0 for r in curve)
    report = (out / "results.md").read_text()
    assert "| sprint |" in report and "| dense |" in report and "SPRINT beats dense" in report
    for png in ("fid_vs_tflops.png", "fid_vs_seconds.png", "fid_final.png", "samples.png", "fid_vs_sampling.png"):
        assert (out / png).stat().st_size > 1000, png
    # a third invocation trains nothing
    lines.clear()
    run_study(path, out=out, seeds=1, progress=False, log=lines.append)
    assert len(lines) == 2 and all("skipped" in line for line in lines)
    # a run's sample grid lost by hand: the report is still written, without it, and says so
    (out / "runs" / "dense" / "seed0" / "study_grid.png").unlink()
    (out / "samples.png").unlink()
    lines.clear()
    run_study(path, out=out, seeds=1, progress=False, log=lines.append)
    assert any("dense's sample grid" in line and "missing" in line for line in lines)
    assert (out / "samples.png").stat().st_size > 1000 and "| dense |" in (out / "results.md").read_text()
    # a finished run copied in under another run's name is refused in one line, not left out of the report unseen
    shutil.rmtree(out / "runs" / "sprint" / "seed0")
    shutil.copytree(out / "runs" / "dense" / "seed0", out / "runs" / "sprint" / "seed0")
    with pytest.raises(UserError, match="written for run dense seed 0, not sprint seed 0"):
        run_study(path, out=out, seeds=1, progress=False)


def test_flops_budget_gives_the_steps_that_spend_it(fmnist_dir):
    cfg = load_config(None, [f"data.root={fmnist_dir}", *TINY])
    cfg = resolve_run_config(cfg, build_dataset(cfg.data))
    masked, dense = train_step_flops(cfg, 0), train_step_flops(cfg, 1)
    assert masked < dense
    budget = (10 * masked + 5 * dense) / 1e12
    split = [10 * masked / (budget * 1e12), 5 * dense / (budget * 1e12)]
    assert stage_steps_for_budget(cfg, "tflops", budget, split) == [10, 5]
    # no split: the config's 3 : 1 step proportions, scaled to spend the budget
    steps = stage_steps_for_budget(cfg, "tflops", 2 * (3 * masked + dense) / 1e12, None)
    assert steps == [6, 2]
    assert stage_steps_for_budget(cfg, "steps", 8, [0.75, 0.25]) == [6, 2]
    assert stage_steps_for_budget(cfg, "seconds", 10, [0.5, 0.5], [0.5, 1.0]) == [10, 5]
    # warm-ups keep their share of a stage: 1 of 3 steps -> 10 of 30; 0 of 1 -> 0 of 2
    scaled = with_steps(cfg, [30, 2])
    assert [(s.steps, s.warmup_steps) for s in scaled.stages] == [(30, 10), (2, 0)]
    with pytest.raises(UserError, match="3 shares but the config has 2 stages"):
        stage_steps_for_budget(cfg, "steps", 8, [0.5, 0.25, 0.25])


@pytest.mark.parametrize("total,points", [(631, 3), (1000, 4), (7, 2), (2, 3), (5, 1)])
def test_curve_points_end_at_the_last_step(total, points):
    every = eval_every(total, points)
    evaluated = sorted({s for s in range(1, total + 1) if s % every == 0} | {total})  # what the trainer evaluates
    assert evaluated[-1] == total and len(evaluated) == min(points, total)


def test_sizes_merge_over_the_top_level(fmnist_dir, tmp_path):
    path = study_file(tmp_path, fmnist_dir)
    assert load_study(path, "cpu").budget.value == 2 and load_study(path, "gpu").budget.value == 4


@pytest.mark.parametrize(
    "body,message",
    [
        ("runs_extra: 1\n", "unknown config key 'runs_extra'"),
        ("budget: {kind: joules, value: 2}\n", "budget kind 'joules'"),
        ("budget: {kind: steps, value: 2, match: dense}\n", "exactly one of value and match"),
        ("claims: [{text: x, a: nothing, b: dense}]\n", "matches no row"),
        ("evaluation: {num_samples: many}\n", "evaluation.num_samples"),
        ("runs: [{name: a, overides: []}]\n", "did you mean 'runs.N.overrides'"),
        ("runs: [{name: a}, {name: a}]\n", "repeated"),
        ("runs: [{name: b, sparsify: {source: a}}]\n", "must name an earlier run"),
        ("runs: [{name: a, split: [0.5, 0.6]}]\n", "sum to 1"),
        ("claims: [{text: x, a: sprint, b: dense, metric: loss}]\n", "compares 'loss'"),
    ],
)
def test_malformed_study_file_is_one_line(fmnist_dir, tmp_path, capsys, body, message):
    path = study_file(tmp_path, fmnist_dir, body)
    assert main(["study", path, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_every_shipped_study_resolves_every_run_config(name, size, tmp_path):
    """A typo in a shipped study's override (or one its base config no longer accepts) fails here, not an hour into a
    study."""
    spec = load_study(STUDY_DIR / f"{name}.yaml", size)
    study = Study(spec, name, size, tmp_path)
    for run in spec.runs:
        if run.sparsify is None:
            cfg = study.base_config(run, seed=1)
            assert cfg.train.seed == 1 and cfg.eval.num_samples == spec.evaluation.num_samples
        else:  # its model comes from the source run, which does not exist here: only its own overrides can be checked
            cfg = load_config(
                find_config(run.base or spec.base), list(run.overrides) + list(spec.run_overrides.get(run.name, []))
            )
        assert cfg.stages, run.name


def test_unknown_size_and_study_names_are_one_line(fmnist_dir, tmp_path, capsys):
    assert main(["study", study_file(tmp_path, fmnist_dir), "--size", "tpu"]) == 2
    assert "has no size 'tpu'; sizes: cpu, gpu" in capsys.readouterr().err
    assert main(["study", "no-such-study"]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("runs: [unclosed\n")
    assert main(["study", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_plot_draws_any_runs(fmnist_dir, tmp_path, capsys):
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
                "eval.every=2",
                "eval.num_samples=10",
                "sample.steps=2",
            ]
        )
        == 0
    )
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl records" in capsys.readouterr().err


def test_sparsify_run_fine_tunes_a_share_of_its_teachers_steps(fmnist_dir, tmp_path):
    body = """
    runs:
      - name: teacher
        overrides: [model.sprint.fusion=none, model.sprint.path_drop_prob=0, stages.0.mask_ratio=0]
        budget: {kind: steps, value: 4}
      - name: sparse
        base: fashion_mnist_sparsedit
        sparsify: {source: teacher, grid: "1:2", pool_depth: 1, modules: 1, sparse_depth: 1, dense_depth: 0}
        overrides: ["stages=[{name: ft, steps: 1, lr: 0.001, mask_ratio: 0}]"]
        budget: {kind: steps, match: teacher, scale: 0.5}
    claims:
      - {text: fewer sampling FLOPs, a: sparse, b: teacher, metric: sample_gflops, factor: 0.9}
    """
    path, out = study_file(tmp_path, fmnist_dir, body), tmp_path / "study"
    data = run_study(path, out=out, seeds=1, progress=False)
    assert data["rows"]["teacher"]["values"]["steps"] == [4] and data["rows"]["sparse"]["values"]["steps"] == [2]
    init = load_config(out / "runs" / "sparse" / "seed0" / "config.yaml")
    assert init.model.arch == "sparsedit" and init.model.sparse.modules == 1 and init.model.preset == "SiT-Nano/4"
    assert data["claims"][0]["verdict"] == "holds"
