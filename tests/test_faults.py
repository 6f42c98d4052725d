"""Fault injection: divergence, signals at random points, concurrent trainers, kill -9 loops, a full disk, and a
table of bad inputs. Every run is a tiny SPRINT on the stand-in data; every resume must match an uninterrupted
run bit for bit."""
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sprintdit import checkpoint as ckpt
from sprintdit import runlock
from sprintdit.cli import main
from sprintdit.config import load_config, to_yaml
from sprintdit.errors import Diverged, Stopped, UserError
from sprintdit.trainer import Trainer

from conftest import write_idx

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STEPS = 8


def overrides(data, *extra):
    return [
        f"data.root={data}", "model.preset=SiT-Nano/4", "model.hidden_size=32", "train.batch_size=8", "train.log_every=1",
        "train.ckpt_every=2", "train.sample_every=0", "train.ema_decay=0.9", "train.keep_last=3",
        f"stages=[{{name: pre, steps: {STEPS // 2}, lr: 0.001, mask_ratio: 0.75}}, {{name: ft, steps: {STEPS // 2}, lr: 0.0005, mask_ratio: 0.0}}]",
        *extra,
    ]


def tiny(data, *extra):
    return load_config(None, overrides(data, *extra))


def weights(trainer):
    return {**{f"m.{k}": v for k, v in trainer.model.state_dict().items()}, **{f"e.{k}": v for k, v in trainer.ema.state_dict().items()}}


def saved_weights(run):
    folder = ckpt.list_checkpoints(run)[-1]
    return {**{f"m.{k}": v for k, v in ckpt.load_weights(folder / "model.safetensors")[0].items()},
            **{f"e.{k}": v for k, v in ckpt.load_weights(folder / "ema.safetensors")[0].items()}}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x0803)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x0801)
    return root


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The weights of the uninterrupted run every interrupted one must reproduce."""
    trainer = Trainer(tiny(data), tmp_path_factory.mktemp("straight") / "run", progress=False)
    trainer.fit()
    return weights(trainer)


def strict_json(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------- divergence


def poison_gradients_at(monkeypatch, steps):
    """From the given steps on, one gradient is NaN after the backward pass (as after an overflow)."""
    real = Trainer.train_step

    def step(self, *args):
        loss = real(self, *args)
        if self.step + 1 in steps:
            self.params[0].grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", step)


def test_nonfinite_step_stops_and_keeps_the_last_finite_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    poison_gradients_at(monkeypatch, range(6, STEPS + 1))
    with pytest.raises(Diverged, match=r"diverged at step 6 \(ft\): loss .*, gradient norm nan.*step_00000005 stands") as err:
        Trainer(tiny(data, "train.ckpt_every=1", "train.keep_last=2"), run, progress=False).fit()
    assert err.value.exit_code == 3
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004", "step_00000005"]  # nothing after the bad step
    assert not ckpt.nonfinite_tensors(saved_weights(run))
    records = strict_json(run / "metrics.jsonl")  # strict JSON: a non-finite number is written as null
    assert records[-1] == {"step": 6, "event": "nonfinite", "loss": records[-1]["loss"], "grad_norm": None}
    # through the CLI: one line, exit code 3, and the run resumes from its last finite checkpoint
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--no-progress"]) == 3
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_skipped_nonfinite_steps_are_counted_and_resume_exactly(data, tmp_path, monkeypatch):
    poison_gradients_at(monkeypatch, {3})
    lone = Trainer(tiny(data, "train.max_nonfinite_steps=1"), tmp_path / "a", progress=False)
    before = [p.detach().clone() for p in lone.params]
    lone.fit(stop_at=2)
    after2 = [p.detach().clone() for p in lone.params]
    lone.fit(stop_at=3)  # the skipped step changes nothing
    assert lone.nonfinite_steps == [3] and lone.step == 3
    assert all(torch.equal(a, b) for a, b in zip(after2, lone.params)) and not all(torch.equal(a, b) for a, b in zip(before, after2))
    lone.fit()
    resumed = Trainer(tiny(data, "train.max_nonfinite_steps=1"), tmp_path / "b", progress=False)
    resumed.fit(stop_at=2)
    resumed = Trainer(None, tmp_path / "b", progress=False)
    resumed.fit()
    assert resumed.nonfinite_steps == [3]
    assert_same(weights(lone), weights(resumed))
    with pytest.raises(Diverged, match="step 3"):  # the default allows none
        Trainer(tiny(data), tmp_path / "c", progress=False).fit()


def test_nonfinite_weights_are_never_written(tmp_path):
    state = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(UserError, match="not finite"):
        ckpt.save_checkpoint(tmp_path, 1, state, state, {}, "x: 1", keep_last=1)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------- signals


def signal_at(monkeypatch, where: str, step: int, signum: int, again: bool = False):
    """Send `signum` to this process at a point of training step `step` (or of the save after it)."""
    send = lambda: os.kill(os.getpid(), signum)
    if where in ("before-forward", "after-backward"):
        real = Trainer.train_step

        def train_step(self, *args):
            hit = self.step + 1 == step
            if hit and where == "before-forward":
                send()
            loss = real(self, *args)
            if hit and where == "after-backward":
                send()
            return loss

        monkeypatch.setattr(Trainer, "train_step", train_step)
    elif where == "inside-optimizer":
        real_update = Trainer.update

        def update(self, loss, stop):
            step_fn = self.optimizer.step

            def stepping(*a, **k):
                if self.step + 1 == step:
                    send()
                return step_fn(*a, **k)

            self.optimizer.step = stepping
            try:
                return real_update(self, loss, stop)
            finally:
                del self.optimizer.step

        monkeypatch.setattr(Trainer, "update", update)
    elif where == "logging":
        real_log = Trainer.log

        def log(self, record):
            if record.get("step") == step:
                send()
            return real_log(self, record)

        monkeypatch.setattr(Trainer, "log", log)
    elif where == "saving":  # the first signal during a step, another while the checkpoint after it is written
        real_save = ckpt.save_checkpoint

        def save(run_dir, at, *args, **kwargs):
            if at == step:
                send()
                if again:
                    send()
            return real_save(run_dir, at, *args, **kwargs)

        monkeypatch.setattr(ckpt, "save_checkpoint", save)


POINTS = ["before-forward", "after-backward", "inside-optimizer", "logging", "saving"]
RNG = random.Random(13)
CASES = [(where, RNG.randrange(1, STEPS), SIGNALS[i % len(SIGNALS)]) for i, where in enumerate(POINTS * 2)]


@pytest.mark.parametrize("where,step,signum", CASES, ids=[f"{w}-step{s}-{signal.Signals(n).name}" for w, s, n in CASES])
def test_signal_at_any_point_saves_and_resumes_bit_for_bit(data, tmp_path, monkeypatch, capsys, straight, where, step, signum):
    if where == "saving":
        step = min(step + step % 2, STEPS - 2)  # periodic saves happen at even steps (train.ckpt_every=2)
    run = tmp_path / "run"
    signal_at(monkeypatch, where, step, signum, again=True)
    with pytest.raises(Stopped) as stopped:
        Trainer(tiny(data), run, progress=False).fit()
    at = step  # the step the signal landed in finishes (or the save it landed in), then the run saves and stops
    assert f"{signal.Signals(signum).name} at step {at}: saved" in str(stopped.value)
    assert stopped.value.exit_code == 128 + signum
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping" in err and (where != "saving" or "being written; it finishes" in err)
    assert ckpt.list_checkpoints(run)[-1].name == f"step_{at:08d}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored
    monkeypatch.undo()
    resumed = Trainer(None, run, progress=False)
    assert resumed.step == at
    resumed.fit()
    assert_same(straight, weights(resumed))


def test_signal_during_a_sample_grid_aborts_it_and_saves(data, tmp_path, monkeypatch, straight):
    real = Trainer.sample_grid
    calls = []

    def grid(self):
        calls.append(self.step)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # a long evaluation: the signal must not wait for it
        return real(self)

    monkeypatch.setattr(Trainer, "sample_grid", grid)
    run = tmp_path / "run"
    tic = time.perf_counter()
    with pytest.raises(Stopped, match="SIGTERM at step 3"):
        Trainer(tiny(data, "train.sample_every=3"), run, progress=False).fit()
    assert calls == [3] and time.perf_counter() - tic < 5
    monkeypatch.undo()
    resumed = Trainer(None, run, progress=False)
    resumed.fit()
    assert_same(straight, weights(resumed))


# ----------------------------------------------------------------------------------- concurrent trainers


HOLDER = """
import sys
from sprintdit.config import load_config
from sprintdit.trainer import Trainer
trainer = Trainer(load_config(None, {args!r}), {run!r}, progress=False)
print("ready", flush=True)
sys.stdin.readline()
trainer.fit()
print("done", flush=True)
"""


def child(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_second_trainer_is_refused_and_the_first_is_unharmed(data, tmp_path, capsys, straight):
    run = tmp_path / "run"
    first = child(HOLDER.format(args=overrides(data), run=str(run)))
    try:
        assert first.stdout.readline().strip() == "ready", first.stderr.read()
        with pytest.raises(UserError, match=rf"in use by another trainer \(pid {first.pid} on {re.escape(socket.gethostname())}\)"):
            Trainer(tiny(data), run, progress=False)
        assert main(["train", "--config", "fashion_mnist_sprint", "--out", str(run), "--no-progress", *overrides(data)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        first.kill()
    assert not (run / runlock.LOCK_NAME).exists()  # released at the end
    assert_same(straight, saved_weights(run))


def test_a_dead_holders_lock_is_taken_over(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = run / runlock.LOCK_NAME
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": 0}))
    Trainer(tiny(data), run, progress=False).fit(stop_at=1)
    assert f"took over the lock of {run} from pid {int(gone.stdout)}" in capsys.readouterr().err
    # a holder on another host counts as alive while it refreshes the lock, and as gone once it stops
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(UserError, match="pid 1 on elsewhere"):
        Trainer(tiny(data), run, progress=False)
    old = time.time() - runlock.STALE_S - 1
    os.utime(lock, (old, old))
    assert Trainer(tiny(data), run, progress=False).step == 1


# ----------------------------------------------------------------------------------- kill -9


KILLED = """
from sprintdit.config import load_config
from sprintdit.trainer import Trainer
trainer = Trainer(load_config(None, {args!r}), {run!r}, progress=False)
print("ready", flush=True)
trainer.fit()
"""


def test_kill_9_loop_resumes_to_the_uninterrupted_weights(data, tmp_path, straight):
    """Repeated SIGKILLs at random moments (many inside checkpoint writes: one per step); then a clean finish."""
    run, rng, kills = tmp_path / "run", random.Random(7), 0
    args = overrides(data, "train.ckpt_every=1", "train.keep_last=2")
    for attempt in range(12):
        proc = child(KILLED.format(args=args, run=str(run)))
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None and attempt < 6:
            proc.send_signal(signal.SIGKILL)
            kills += proc.wait() == -signal.SIGKILL
            continue
        assert proc.wait(120) == 0, proc.stderr.read()
        break
    assert kills >= 3
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == f"step_{STEPS:08d}"
    assert_same(straight, saved_weights(run))
    assert [r["step"] for r in strict_json(run / "metrics.jsonl")] == list(range(1, STEPS + 1))


# ----------------------------------------------------------------------------------- full or read-only disk


def failing_writes(monkeypatch, code):
    real = ckpt.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if "/.tmp_step_00000006" in path:
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, r"no space left on device: free \d+ MB in"), (errno.EROFS, "Read-only file system")])
def test_failed_write_leaves_the_previous_checkpoint_and_the_run_continues(data, tmp_path, monkeypatch, straight, code, message):
    run = tmp_path / "run"
    failing_writes(monkeypatch, code)
    with pytest.raises(UserError, match=message):
        Trainer(tiny(data), run, progress=False).fit()
    assert ckpt.list_checkpoints(run)[-1].name == "step_00000004"
    assert not list((run / "checkpoints").glob(".tmp_*"))
    monkeypatch.undo()  # space is back
    resumed = Trainer(None, run, progress=False)
    assert resumed.step == 4
    resumed.fit()
    assert_same(straight, weights(resumed))


def test_real_full_disk_on_a_small_tmpfs(data, tmp_path, straight):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True).returncode:  # ~3 checkpoints
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        run = mount / "run"
        with pytest.raises(UserError, match=r"no space left on device: free \d+ MB in"):
            Trainer(tiny(data, "train.ckpt_every=1", "train.keep_last=8"), run, progress=False).fit()
        kept = ckpt.list_checkpoints(run)
        assert kept and not list((run / "checkpoints").glob(".tmp_*"))
        ckpt.load_weights(kept[-1] / "ema.safetensors")  # intact
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = Trainer(None, run, progress=False)
        resumed.fit()
        assert_same(straight, weights(resumed))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ----------------------------------------------------------------------------------- bad input: one line each


@pytest.fixture(scope="module")
def world(data, tmp_path_factory):
    """A finished tiny run, and damaged or foreign files to hand the commands."""
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    trainer = Trainer(tiny(data, "stages.0.steps=1", "stages.1.steps=1"), run, progress=False)
    trainer.fit()
    ema = trainer.ema.state_dict()
    meta = {"config": trainer.config_yaml, "step": "1", "format": "sprintdit"}
    poisoned = {k: v.clone() for k, v in ema.items()}
    next(v for v in poisoned.values() if v.is_floating_point()).fill_(float("nan"))
    save_file(poisoned, str(root / "nonfinite.safetensors"), metadata=meta)
    wrong = {k: (torch.zeros(3) if i == 0 else v.contiguous()) for i, (k, v) in enumerate(ema.items())}
    save_file(wrong, str(root / "wrong_shape.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(root / "bad_meta.safetensors"), metadata={**meta, "config": "model: [unclosed"})
    other = load_config(None, ["model.preset=SiT-Nano/4", "model.hidden_size=64", "model.input_size=[32,32]", "model.in_channels=1",
                               "model.num_classes=10", "model.sprint.fusion=none", "model.sprint.path_drop_prob=0", "sample.guidance=cfg"])
    save_file({k: v.contiguous() for k, v in ema.items()}, str(root / "other_arch.safetensors"), metadata={**meta, "config": to_yaml(other)})
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "stages_map.yaml").write_text("stages: {name: pre, steps: 2}\n")
    (root / "a_file").write_text("x")
    np.savez(root / "no_arr0.npz", images=np.zeros((4, 32, 32, 1), np.uint8))
    np.savez(root / "float_labels.npz", np.zeros((4, 32, 32, 1), np.uint8), np.array([0.5, 1, 2, 3]))
    np.savez(root / "big_labels.npz", np.zeros((4, 32, 32, 1), np.uint8), np.array([0, 1, 2, 30]))
    np.savez(root / "real.npz", np.zeros((4, 32, 32, 1), np.uint8))
    pickled = root / "pickled"
    shutil.copytree(run, pickled)
    torch.save({"payload": Exception("not a tensor")}, ckpt.list_checkpoints(pickled)[-1] / "state.pt")
    garbage = root / "garbage_cfg"
    shutil.copytree(run, garbage)
    (garbage / "config.yaml").write_text("train: {batch_size: [\n")
    broken = root / "broken_data"
    shutil.copytree(data, broken)
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    labels = root / "bad_labels"
    shutil.copytree(data, labels)
    write_idx(labels / "train-labels-idx1-ubyte.gz", np.arange(40) % 12, 0x0801)
    return root


TRAIN = ["train", "--config", "fashion_mnist_sprint", "--no-progress"]
FINETUNE = ["train", "--config", "fashion_mnist_sparsedit", "--no-progress"]  # its model comes from train.init_from
BAD = [  # (argv with {root}, {data}, {out}; a phrase of the one-line message)
    (["train", "--config", "{root}/list.yaml"], "must be a mapping of config sections"),
    (["train", "--config", "{root}/stages_map.yaml"], "stages is a list of stages"),
    (TRAIN + ["stages={{name: x}}"], "stages is a list of stages"),
    (TRAIN + ["model.num_heads=0"], "model.num_heads must be >= 1"),
    (TRAIN + ["model.patch_size=-2"], "model.patch_size must be >= 1"),
    (TRAIN + ["model.hidden_size=0"], "model.hidden_size must be >= 1"),
    (TRAIN + ["train.batch_size=-8"], "train.batch_size must be >= 1"),
    (TRAIN + ["stages.0.batch_size=0"], "batch_size >= 1"),
    (TRAIN + ["stages.0.lr=.inf"], "lr finite"),
    (TRAIN + ["train.device=cuda"], "no CUDA device"),
    (TRAIN + ["train.device=tpu"], "device 'tpu' is unknown"),
    (FINETUNE + ["train.init_from={root}/wrong_shape.safetensors"], "does not fit this model"),
    (FINETUNE + ["train.init_from={root}/bad_meta.safetensors"], "not valid YAML"),
    (TRAIN + ["data.root={root}/broken_data"], "damaged gzip"),
    (TRAIN + ["data.root={root}/bad_labels"], "labels must be in [0, 9]"),
    (["train", "--out", "{root}/garbage_cfg", "--no-progress"], "not valid YAML"),
    (["train", "--out", "{root}/pickled", "--no-progress"], "pickled Python objects"),
    (TRAIN + ["--out", "{root}/a_file"], "is a file"),
    (["sample", "--checkpoint", "{root}/wrong_shape.safetensors"], "does not fit this model"),
    (["sample", "--checkpoint", "{root}/other_arch.safetensors"], "does not fit this model"),
    (["sample", "--checkpoint", "{root}/bad_meta.safetensors"], "not valid YAML"),
    (["sample", "--checkpoint", "{root}/nonfinite.safetensors"], "not finite"),
    (["sample", "--checkpoint", "{root}/run", "--scale", "nan"], "finite number"),
    (["sample", "--checkpoint", "{root}/run", "--labels", "5-2"], "is empty"),
    (["sample", "--checkpoint", "{root}/run", "--device", "tpu"], "device 'tpu' is unknown"),
    (["sample", "--checkpoint", "{root}/run", "--out", "{root}/a_file"], "is a file"),
    (["evaluate", "--checkpoint", "{root}/wrong_shape.safetensors"], "does not fit this model"),
    (["evaluate", "--samples", "{root}/no_arr0.npz"], "has no arr_0"),
    (["evaluate", "--samples", "{root}/float_labels.npz"], "integer class labels"),
    (["evaluate", "--samples", "{root}/big_labels.npz", "--data-root", "{data}"], "labels must be in [0, 9]"),
    (["evaluate", "--samples", "{root}/real.npz", "--write-ref", "{root}/missing/ref.npz"], "does not exist; create it first"),
    (["sparsify", "--checkpoint", "{root}/other_arch.safetensors", "--out", "{out}", "--pool-depth", "1", "--modules", "1",
      "--sparse-depth", "1", "--dense-depth", "0", "--sparse-grid", "4"], "does not fit this model"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{i:02d}-{b[1][:30]}" for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_and_leaves_nothing(world, data, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.format(root=world, data=data, out=out) for a in argv]
    if argv[:2] == ["train", "--config"] and "--out" not in argv:
        argv += ["--out", str(out)]
    if argv[:2] == ["train", "--config"] and not any(a.startswith("data.root=") for a in argv):
        argv += [f"data.root={data}"]
    before = sorted(p.relative_to(world) for p in world.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err and "weights_only=False" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and message in err, err
    assert not out.exists()  # no run folder (or output) left behind
    assert sorted(p.relative_to(world) for p in world.rglob("*")) == before


def test_ctrl_c_during_start_up_is_one_line(data, tmp_path, capsys, monkeypatch):
    import sprintdit.trainer as train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_dataset", interrupted)
    assert main(TRAIN + ["--out", str(tmp_path / "out"), f"data.root={data}"]) == 128 + signal.SIGINT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unreadable_images_are_reported_once_and_replaced_the_same_way(tmp_path, capsys):
    from PIL import Image

    from sprintdit.data import ImageFolder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (c == "b") * 120, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes(b"")  # zero bytes
    (tmp_path / "b" / "0.png").write_bytes(b"\x89PNG garbage")  # damaged
    data = ImageFolder(tmp_path, 8)
    x, y = data.load(torch.arange(len(data)))
    again, _ = data.load(torch.arange(len(data)))
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping unreadable image") for w in warnings)
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(x, again)
    assert torch.equal(x[1], x[2]) and torch.equal(x[3], x[4])  # replaced by the next readable file
