import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from sprintdit import checkpoint as ckpt
from sprintdit.config import load_config
from sprintdit.errors import Stopped, UserError
from sprintdit.training import Trainer
from sprintdit.training.schedules import due_after, ema_decay_at, ema_updates, stage_at, stage_lr


def tiny_run(fmnist_dir, *extra):
    """Two stages (masked, then dense) of a tiny SPRINT on the stand-in data."""
    return load_config(
        None,
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "train.batch_size=8",
            "train.grad_accum=2",
            "train.log_every=1",
            "train.ckpt_every=100",
            "train.sample_every=0",
            "train.ema_decay=0.9",
            "train.keep_last=5",
            "stages=[{name: pre, steps: 3, lr: 0.001, warmup_steps: 2, mask_ratio: 0.75}, {name: ft, steps: 3, lr: "
            "0.0005, mask_ratio: 0.0}]",
            *extra,
        ],
    )


def weights(trainer):
    return {
        **{f"m.{k}": v for k, v in trainer.model.state_dict().items()},
        **{f"e.{k}": v for k, v in trainer.ema.state_dict().items()},
    }


def test_resume_is_bitwise_exact(fmnist_dir, tmp_path):
    straight = Trainer(tiny_run(fmnist_dir), tmp_path / "a", progress=False)
    straight.fit()
    # same run stopped after 2 steps (mid pre-training), then resumed by re-running on the folder
    first = Trainer(tiny_run(fmnist_dir), tmp_path / "b", progress=False)
    first.fit(stop_at=2)
    assert first.step == 2
    resumed = Trainer(tiny_run(fmnist_dir), tmp_path / "b", progress=False)
    assert resumed.step == 2 and resumed.state.position == 16
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.networks.optimizer.state_dict()["state"], resumed.networks.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # one per step, none duplicated by the resume


def test_interrupt_saves_and_resume_is_exact(fmnist_dir, tmp_path, monkeypatch):
    straight = Trainer(tiny_run(fmnist_dir), tmp_path / "a", progress=False)
    straight.fit()
    calls = {"n": 0}
    real_step = Trainer.train_step

    def interrupted_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of step 3's forward/backward: the step finishes, then the run saves
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(Stopped, match="SIGINT at step 3") as stopped:
        Trainer(tiny_run(fmnist_dir), tmp_path / "b", progress=False).fit()
    assert stopped.value.exit_code == 128 + signal.SIGINT
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(tiny_run(fmnist_dir), tmp_path / "b", progress=False)
    assert resumed.step == 3
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_reduces_loss_and_keeps_mask_token(fmnist_dir, tmp_path):
    trainer = Trainer(tiny_run(fmnist_dir, "stages.0.steps=12", "stages.0.lr=0.003"), tmp_path / "r", progress=False)
    mask_token = trainer.model.mask_token.clone()
    fusion = trainer.model.fusion.weight.detach().clone()
    trainer.fit()
    import json

    losses = [json.loads(l)["loss"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert torch.equal(trainer.model.mask_token, mask_token)  # fixed, never trained
    assert not torch.equal(trainer.model.fusion.weight, fusion)  # the fusion is trained


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(fmnist_dir, tmp_path, precision):
    trainer = Trainer(
        tiny_run(fmnist_dir, f"train.precision={precision}", "stages.1.steps=1"), tmp_path / precision, progress=False
    )
    assert trainer.networks.scaler.is_enabled() == (precision == "fp16")
    before = [p.detach().clone() for p in trainer.networks.params]
    trainer.fit()
    assert trainer.step == 4
    assert all(torch.isfinite(p).all() for p in trainer.networks.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.networks.params))


def test_compile_honours_its_options(fmnist_dir, tmp_path, monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny_run(fmnist_dir, "train.compile=true", "train.compile_mode=max-autotune", "train.compile_fullgraph=true")
    Trainer(cfg, tmp_path / "c", progress=False)
    assert seen == {"mode": "max-autotune", "fullgraph": True, "dynamic": False}


def test_what_is_due_after_each_step():
    cfg = load_config(
        None,
        [
            "stages=[{name: a, steps: 3, lr: 0.1}, {name: b, steps: 4, lr: 0.1}]",
            "train.log_every=2",
            "train.ckpt_every=4",
            "train.sample_every=0",
            "eval.every=3",
        ],
    )
    due = {step: due_after(cfg, step, end=7) for step in range(1, 8)}
    assert [s for s, d in due.items() if d.log] == [1, 2, 3, 4, 6, 7]  # every 2, the first step, each stage's end
    assert [s for s, d in due.items() if d.checkpoint] == [3, 4, 7]  # every 4 and each stage's end
    assert [s for s, d in due.items() if d.evaluation] == [3, 6, 7]  # every 3 and the run's end
    assert not any(d.grid for d in due.values())  # sample_every 0: never
    assert due_after(cfg, 5, end=5).evaluation and due_after(cfg, 5, end=5).checkpoint  # stop_at ends the run early


def test_compiled_stages_are_built_before_the_first_step(fmnist_dir, tmp_path, monkeypatch):
    """With train.compile every stage's graph is compiled before step 1 (none at the stage switch), and the warm-up
    changes nothing: the weights equal an uncompiled run's. Dynamo's counting backend stands in for inductor."""
    from torch._dynamo.testing import CompileCounter

    plain = Trainer(tiny_run(fmnist_dir), tmp_path / "plain", progress=False)
    plain.fit()
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counter, dynamic=kw["dynamic"]))
    graphs = {}
    for name, up_front in (("built", True), ("lazy", False)):
        torch._dynamo.reset()
        counter.clear()
        trainer = Trainer(tiny_run(fmnist_dir, "train.compile=true"), tmp_path / name, progress=False)
        if not up_front:
            monkeypatch.setattr(trainer, "build_graphs", lambda end: None)
        trainer.build_graphs(6)
        before = counter.frame_count
        trainer.fit()
        graphs[name] = (before, counter.frame_count - before)
        assert all(torch.equal(v, weights(plain)[k]) for k, v in weights(trainer).items()), name
    assert graphs["built"][0] > 0 and graphs["built"][1] == 0  # compiled up front, nothing while training
    assert graphs["lazy"][1] >= graphs["built"][0]  # without it every graph compiles inside the run, at the switch too


def test_stage_schedule():
    cfg = load_config(
        None,
        ["stages=[{name: a, steps: 10, lr: 0.1, warmup_steps: 4, warmup_start: 0.0}, {name: b, steps: 5, lr: 0.2}]"],
    )
    assert (
        stage_at(cfg.stages, 0) == (0, 0) and stage_at(cfg.stages, 9) == (0, 0) and stage_at(cfg.stages, 10) == (1, 10)
    )
    assert [stage_lr(cfg.stages[0], i) for i in (0, 2, 4, 9)] == [0.0, 0.05, 0.1, 0.1]
    cosine = replace(cfg.stages[0], decay="cosine")  # 6 steps after warm-up: lr (1 + cos(pi k / 6)) / 2
    assert [stage_lr(cosine, i) for i in (2, 4, 7)] == [0.05, 0.1, pytest.approx(0.05)]
    assert stage_lr(cosine, 9) == pytest.approx(0.1 * (1 + math.cos(math.pi * 5 / 6)) / 2) and stage_lr(cosine, 9) > 0
    with pytest.raises(UserError, match="decay"):
        load_config(None, ["stages.0.decay=linear"])


def test_other_config_on_existing_run_is_refused(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_run(fmnist_dir), run, progress=False)  # no checkpoint yet: another config starts it afresh
    fresh = Trainer(tiny_run(fmnist_dir, "train.seed=2"), run, progress=False)
    assert "no checkpoint yet" in capsys.readouterr().err and fresh.cfg.train.seed == 2
    fresh.fit(stop_at=1)
    with pytest.raises(UserError, match="another config"):
        Trainer(tiny_run(fmnist_dir, "train.seed=1"), run, progress=False)
    # sampling may change
    resumed = Trainer(tiny_run(fmnist_dir, "train.seed=2", "sample.scale=5.0"), run, progress=False)
    assert resumed.cfg.sample.scale == 5.0 and "scale: 5.0" in (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()  # the checkpoint's own config still guards the run
    with pytest.raises(UserError, match="step_00000001 was written with another config"):
        Trainer(tiny_run(fmnist_dir, "train.seed=1"), run, progress=False)
    other = tmp_path / "other"  # a step folder copied in from another run
    Trainer(tiny_run(fmnist_dir, "train.seed=3"), other, progress=False).fit(stop_at=2)
    shutil.copytree(ckpt.step_dir(other, 2), ckpt.step_dir(run, 2))
    with pytest.raises(UserError, match=r"step_00000001 was written with another config \(seed: 2 -> seed: 3\)"):
        Trainer(None, run, progress=False)


def test_kill_during_checkpoint_write_keeps_previous(fmnist_dir, tmp_path):
    run = tmp_path / "r"
    trainer = Trainer(tiny_run(fmnist_dir, "stages.1.steps=1"), run, progress=False)
    trainer.fit()
    good = ckpt.list_checkpoints(run)[-1]
    # a real SIGKILL while the training state of a later checkpoint is being written
    script = textwrap.dedent(f"""
        import os, signal, torch
        from sprintdit import checkpoint as ckpt
        def dying_save(obj, path):
            open(path, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        state = {{"w": torch.ones(3)}}
        ckpt.save_checkpoint(ckpt.Path({str(run)!r}), 99, state, state, {{}}, "config: x", keep_last=5)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert list((run / "checkpoints").glob(".tmp_step_00000099_*"))  # the partial write exists, hidden
    assert ckpt.list_checkpoints(run)[-1] == good
    resumed = Trainer(None, run, progress=False)  # the next start clears what the killed writer left
    assert resumed.step == 4 and not list((run / "checkpoints").glob(".tmp_step_*"))


def test_keep_last_and_latest_by_step(fmnist_dir, tmp_path):
    run = tmp_path / "r"
    trainer = Trainer(tiny_run(fmnist_dir, "train.ckpt_every=1", "train.keep_last=2"), run, progress=False)
    trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000005", "step_00000006"]


def test_checkpoint_weights_rebuild_the_model_alone(fmnist_dir, tmp_path):
    run = tmp_path / "r"
    trainer = Trainer(tiny_run(fmnist_dir, "stages.1.steps=1"), run, progress=False)
    trainer.fit()
    model, cfg = ckpt.load_model(run, use_ema=True)
    assert cfg.model == trainer.cfg.model
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    raw = load_file(str(ckpt.list_checkpoints(run)[-1] / "model.safetensors"))
    assert torch.equal(raw["blocks.0.attn.qkv.weight"], trainer.model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_a_clear_error(fmnist_dir, tmp_path, damage):
    run = tmp_path / "r"
    Trainer(tiny_run(fmnist_dir, "stages.1.steps=1"), run, progress=False).fit()
    folder = ckpt.list_checkpoints(run)[-1]
    for name in ("ema.safetensors", "state.pt"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_model(run)
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_train_state(folder / "state.pt")


def test_ema_follows_its_warmup_recursion(fmnist_dir, tmp_path):
    """EMA_k = d_k EMA_(k-1) + (1 - d_k) theta_k with d_k = min(decay, (1 + k - 1) / (10 + k - 1)), EMA_0 = the initial
    weights."""
    trainer = Trainer(tiny_run(fmnist_dir, "train.ema_decay=0.3"), tmp_path / "r", progress=False)
    expected = {k: v.clone().double() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    decays = []
    for step in range(1, 5):
        trainer.fit(stop_at=step)
        decays.append(ema_decay_at(trainer.cfg.train, step - 1))
        for k, v in trainer.model.state_dict().items():
            if k in expected:
                expected[k] = decays[-1] * expected[k] + (1 - decays[-1]) * v.double()
    assert decays == [0.1, 2 / 11, 0.25, 0.3]  # warm-up (4 / 13 at the fourth), then capped by ema_decay
    ema = trainer.ema.state_dict()
    assert all(torch.allclose(ema[k].double(), v, atol=1e-6) for k, v in expected.items())
    plain = Trainer(
        tiny_run(fmnist_dir, "train.ema_decay=0.5", "train.ema_warmup=false"), tmp_path / "p", progress=False
    )
    assert ema_decay_at(plain.cfg.train, 0) == 0.5


def test_ema_restart_starts_the_warmup_again_at_its_stage(fmnist_dir, tmp_path):
    """With stages.1.ema_restart the fine-tune's first update keeps a tenth of the pre-training average (decay 1/10),
    the
    next 2/11, ...: the EMA follows that recursion over the whole run."""
    trainer = Trainer(
        tiny_run(fmnist_dir, "train.ema_decay=0.9", "stages.1.ema_restart=true"), tmp_path / "r", progress=False
    )
    expected = {k: v.clone().double() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    for step, decay in enumerate([0.1, 2 / 11, 0.25, 0.1, 2 / 11, 0.25], start=1):
        trainer.fit(stop_at=step)
        for k, v in trainer.model.state_dict().items():
            if k in expected:
                expected[k] = decay * expected[k] + (1 - decay) * v.double()
    ema = trainer.ema.state_dict()
    assert all(torch.allclose(ema[k].double(), v, atol=1e-6) for k, v in expected.items())


def test_ema_updates_count_from_the_latest_restart_less_skipped_steps(fmnist_dir):
    cfg = tiny_run(
        fmnist_dir, "stages=[{name: a, steps: 4}, {name: b, steps: 3, ema_restart: true}, {name: c, steps: 5}]"
    )
    assert [ema_updates(cfg, step, []) for step in range(12)] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    # step 2 was before the restart (at step 4)
    assert ema_updates(cfg, 3, [2]) == 2 and ema_updates(cfg, 9, [2, 6]) == 4
    plain = tiny_run(fmnist_dir, "stages=[{name: a, steps: 4}, {name: b, steps: 3}]")
    assert ema_updates(plain, 6, [2, 6]) == 4
