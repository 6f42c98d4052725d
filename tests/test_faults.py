"""Fault injection: divergence, signals at random points, concurrent trainers, kill -9 loops, a full disk, and a
table of bad inputs. Every run is a tiny SPRINT on the stand-in data; every resume must match an uninterrupted
run bit for bit."""

import errno
import json
import os
import pathlib
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
from sprintdit.training import runlock
from sprintdit.cli import main
from sprintdit.config import load_config, to_yaml
from sprintdit.errors import Diverged, Stopped, UserError
from sprintdit.training import Trainer
from sprintdit.training.periodic import Periodic

from conftest import write_idx

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STEPS = 8


def overrides(data, *extra):
    return [
        f"data.root={data}",
        "model.preset=SiT-Nano/4",
        "model.hidden_size=32",
        "train.batch_size=8",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.sample_every=0",
        "train.ema_decay=0.9",
        "train.keep_last=3",
        f"stages=[{{name: pre, steps: {STEPS // 2}, lr: 0.001, mask_ratio: 0.75}}, "
        f"{{name: ft, steps: {STEPS // 2}, lr: 0.0005, mask_ratio: 0.0}}]",
        *extra,
    ]


def tiny(data, *extra):
    return load_config(None, overrides(data, *extra))


def weights(trainer):
    return {
        **{f"m.{k}": v for k, v in trainer.model.state_dict().items()},
        **{f"e.{k}": v for k, v in trainer.ema.state_dict().items()},
    }


def saved_weights(run):
    folder = ckpt.list_checkpoints(run)[-1]
    return {
        **{f"m.{k}": v for k, v in ckpt.load_weights(folder / "model.safetensors")[0].items()},
        **{f"e.{k}": v for k, v in ckpt.load_weights(folder / "ema.safetensors")[0].items()},
    }


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
            self.networks.params[0].grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", step)


def test_nonfinite_step_stops_and_keeps_the_last_finite_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    poison_gradients_at(monkeypatch, range(6, STEPS + 1))
    with pytest.raises(
        Diverged, match=r"diverged at step 6 \(ft\): loss .*, gradient norm nan.*step_00000005 stands"
    ) as err:
        Trainer(tiny(data, "train.ckpt_every=1", "train.keep_last=2"), run, progress=False).fit()
    assert err.value.exit_code == 3
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        "step_00000004",
        "step_00000005",
    ]  # nothing after the bad step
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
    before = [p.detach().clone() for p in lone.networks.params]
    lone.fit(stop_at=2)
    after2 = [p.detach().clone() for p in lone.networks.params]
    lone.fit(stop_at=3)  # the skipped step changes nothing
    assert lone.state.nonfinite_steps == [3] and lone.step == 3
    assert all(torch.equal(a, b) for a, b in zip(after2, lone.networks.params)) and not all(
        torch.equal(a, b) for a, b in zip(before, after2)
    )
    lone.fit()
    resumed = Trainer(tiny(data, "train.max_nonfinite_steps=1"), tmp_path / "b", progress=False)
    resumed.fit(stop_at=2)
    resumed = Trainer(None, tmp_path / "b", progress=False)
    resumed.fit()
    assert resumed.state.nonfinite_steps == [3]
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
            optimizer = self.networks.optimizer
            step_fn = optimizer.step

            def stepping(*a, **k):
                if self.step + 1 == step:
                    send()
                return step_fn(*a, **k)

            optimizer.step = stepping
            try:
                return real_update(self, loss, stop)
            finally:
                del optimizer.step

        monkeypatch.setattr(Trainer, "update", update)
    elif where == "logging":
        real_log = Periodic.log

        def log(self, record):
            if record.get("step") == step:
                send()
            return real_log(self, record)

        monkeypatch.setattr(Periodic, "log", log)
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
def test_signal_at_any_point_saves_and_resumes_bit_for_bit(
    data, tmp_path, monkeypatch, capsys, straight, where, step, signum
):
    if where == "saving":
        step = min(step + step % 2, STEPS - 2)  # periodic saves happen at even steps (train.ckpt_every=2)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when pytest runs as a background job
    signal_at(monkeypatch, where, step, signum, again=True)
    with pytest.raises(Stopped) as stopped:
        Trainer(tiny(data), run, progress=False).fit()
    at = step  # the step the signal landed in finishes (or the save it landed in), then the run saves and stops
    assert f"{signal.Signals(signum).name} at step {at}: saved" in str(stopped.value)
    assert stopped.value.exit_code == 128 + signum
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping" in err and (
        where != "saving" or "being written; it finishes" in err
    )
    assert ckpt.list_checkpoints(run)[-1].name == f"step_{at:08d}"
    assert signal.getsignal(signal.SIGINT) is before  # handlers are restored
    monkeypatch.undo()
    resumed = Trainer(None, run, progress=False)
    assert resumed.step == at
    resumed.fit()
    assert_same(straight, weights(resumed))


LONG_EVALUATION_S = 5  # a grid that would take this long is abandoned at the signal, not waited for


def test_signal_during_a_sample_grid_aborts_it_and_saves(data, tmp_path, monkeypatch, straight):
    real = Periodic.sample_grid
    calls = []

    def grid(self, run, step):
        calls.append((step, time.perf_counter()))  # timed from the signal: a loaded machine's setup does not count
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(LONG_EVALUATION_S)  # a long evaluation: the signal must not wait for it
        return real(self, run, step)

    monkeypatch.setattr(Periodic, "sample_grid", grid)
    run = tmp_path / "run"
    with pytest.raises(Stopped, match="SIGTERM at step 3"):
        Trainer(tiny(data, "train.sample_every=3"), run, progress=False).fit()
    ((step, signalled),) = calls
    assert step == 3 and time.perf_counter() - signalled < LONG_EVALUATION_S
    monkeypatch.undo()
    resumed = Trainer(None, run, progress=False)
    resumed.fit()
    assert_same(straight, weights(resumed))


# ----------------------------------------------------------------------------------- concurrent trainers


HOLDER = """
import sys
from sprintdit.config import load_config
from sprintdit.training import Trainer
trainer = Trainer(load_config(None, {args!r}), {run!r}, progress=False)
print("ready", flush=True)
sys.stdin.readline()
trainer.fit()
print("done", flush=True)
"""


def child(script):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_second_trainer_is_refused_and_the_first_is_unharmed(data, tmp_path, capsys, straight):
    run = tmp_path / "run"
    first = child(HOLDER.format(args=overrides(data), run=str(run)))
    try:
        assert first.stdout.readline().strip() == "ready", first.stderr.read()
        with pytest.raises(
            UserError, match=rf"in use by another trainer \(pid {first.pid} on {re.escape(socket.gethostname())}\)"
        ):
            Trainer(tiny(data), run, progress=False)
        assert (
            main(["train", "--config", "fashion_mnist_sprint", "--out", str(run), "--no-progress", *overrides(data)])
            == 2
        )
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


def fail_lock_writes(monkeypatch, code):
    """Every write or removal of a lock file fails with `code` (a full disk, a folder turned read-only)."""
    write_text, unlink = pathlib.Path.write_text, pathlib.Path.unlink

    def failing(real):
        def call(self, *args, **kwargs):
            if self.name.startswith(runlock.LOCK_NAME):
                raise OSError(code, os.strerror(code))
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(pathlib.Path, "write_text", failing(write_text))
    monkeypatch.setattr(pathlib.Path, "unlink", failing(unlink))


def test_a_lock_that_cannot_be_written_is_not_taken_and_leaves_nothing(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "new" / "run"
    fail_lock_writes(monkeypatch, errno.ENOSPC)
    assert main(TRAIN + ["--out", str(run), *overrides(data)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot lock run folder" in err and "No space left" in err, err
    assert not (tmp_path / "new").exists()  # neither the run folder nor the folders above it that the start made
    monkeypatch.undo()  # space is back: the same command works at once
    assert main(TRAIN + ["--out", str(run), "--stop-at", "1", *overrides(data)]) == 0
    # a lock whose content names no holder (an older sprintdit's start on a full disk, a damaged file) is stale
    (run / runlock.LOCK_NAME).write_text("")
    Trainer(None, run, progress=False).fit(stop_at=2)
    assert "took over the lock" in capsys.readouterr().err and not (run / runlock.LOCK_NAME).exists()


def test_releasing_the_lock_of_a_folder_turned_read_only_does_not_mask_the_error(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(TRAIN + ["--out", str(run), "--stop-at", "2", *overrides(data)]) == 0
    capsys.readouterr()
    failing_writes(monkeypatch, errno.EROFS)  # the checkpoint of step 6 cannot be written ...
    real = runlock.RunLock.acquire

    def acquire(self):
        note = real(self)
        fail_lock_writes(monkeypatch, errno.EROFS)  # ... nor, once the run holds it, its lock removed
        return note

    monkeypatch.setattr(runlock.RunLock, "acquire", acquire)
    assert main(["train", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    note, error = err.strip().splitlines()  # the lock is left, and said so; then the real error
    assert (
        "Traceback" not in err and error.startswith("error: cannot write checkpoint step 6") and "Read-only" in error
    ), err
    assert note.startswith("note: could not remove") and "takes it over" in note
    monkeypatch.undo()
    assert Trainer(None, run, progress=False).step == 4  # its own dead lock is taken over at once


# ----------------------------------------------------------------------------------- kill -9


KILLED = """
from sprintdit.config import load_config
from sprintdit.training import Trainer
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


# ----------------------------------------------------------------------------------- step identity and rotation


def test_a_renamed_or_copied_step_folder_is_refused_and_the_real_newest_resumes(data, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny(data), run, progress=False).fit()  # checkpoints 4, 6, 8
    root = run / "checkpoints"
    shutil.copytree(root / "step_00000004", root / "step_00000099")
    with pytest.raises(
        UserError, match=r"step_00000099 is named step 99 but its weights record step 4 \(renamed or copied\?\)"
    ):
        Trainer(None, run, progress=False)
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    assert [p.name for p in root.iterdir()] and (root / "step_00000006").is_dir()  # nothing was rotated away
    shutil.rmtree(root / "step_00000099")
    # weights renamed along with a training state from another step: the state's step is the truth too
    shutil.copy(root / "step_00000004" / "state.pt", root / "step_00000008" / "state.pt")
    with pytest.raises(UserError, match="step_00000008 is named step 8 but its training state records step 4"):
        Trainer(None, run, progress=False)


class Killed(BaseException):
    """A stand-in for SIGKILL: nothing after it runs (no handler catches a BaseException it does not know)."""


def test_a_kill_during_rotation_leaves_no_partial_checkpoint_and_the_next_start_cleans_it(
    data, tmp_path, monkeypatch, straight
):
    run = tmp_path / "run"
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if os.path.basename(path).startswith(".del_step_") and os.path.isdir(path):
            os.unlink(os.path.join(path, "state.pt"))  # one file gone, then the process dies
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        Trainer(tiny(data, "train.keep_last=2"), run, progress=False).fit()  # the save at step 6 drops step 2
    monkeypatch.undo()
    root = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    assert all(all((p / f).is_file() for f in ckpt.FILES) for p in root.glob("step_*"))  # every step_* folder is whole
    assert list(root.glob(".del_step_00000002_*"))
    # an incomplete step folder left by an older sprintdit's deletion is cleaned too
    (root / "step_00000001").mkdir()
    shutil.copy(root / "step_00000004" / "model.safetensors", root / "step_00000001")
    resumed = Trainer(None, run, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]
    assert resumed.step == 6
    resumed.fit()
    assert_same(straight, weights(resumed))


# ----------------------------------------------------------------------------------- full or read-only disk


def failing_writes(monkeypatch, code):
    real = ckpt.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if "/.tmp_step_00000006" in path:
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.parametrize(
    "code,message", [(errno.ENOSPC, r"no space left on device: free \d+ MB in"), (errno.EROFS, "Read-only file system")]
)
def test_failed_write_leaves_the_previous_checkpoint_and_the_run_continues(
    data, tmp_path, monkeypatch, straight, code, message
):
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


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MB tmpfs (room for about 3 tiny checkpoints), unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_start_on_a_really_full_disk_leaves_nothing_and_works_once_space_is_back(data, small_tmpfs, capsys):
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    run = small_tmpfs / "run"
    assert main(TRAIN + ["--out", str(run), *overrides(data)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]
    filler.unlink()
    assert main(TRAIN + ["--out", str(run), "--stop-at", "1", *overrides(data)]) == 0


def test_real_full_disk_on_a_small_tmpfs(data, small_tmpfs, straight):
    run = small_tmpfs / "run"
    with pytest.raises(UserError, match=r"no space left on device: free \d+ MB in"):
        Trainer(tiny(data, "train.ckpt_every=1", "train.keep_last=8"), run, progress=False).fit()
    kept = ckpt.list_checkpoints(run)
    assert kept and not list((run / "checkpoints").glob(".tmp_*"))
    ckpt.load_weights(kept[-1] / "ema.safetensors")  # intact
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    resumed = Trainer(None, run, progress=False)
    resumed.fit()
    assert_same(straight, weights(resumed))


# ----------------------------------------------------------------------------------- bad input: one line each


@pytest.fixture(scope="module")
def world(data, tmp_path_factory):
    """A finished tiny run, and damaged or foreign files to hand the commands."""
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    trainer = Trainer(tiny(data, "stages.0.steps=1", "stages.1.steps=1"), run, progress=False)
    trainer.fit()
    ema = trainer.ema.state_dict()
    meta = {"config": to_yaml(trainer.cfg), "step": "1", "format": "sprintdit"}
    poisoned = {k: v.clone() for k, v in ema.items()}
    next(v for v in poisoned.values() if v.is_floating_point()).fill_(float("nan"))
    save_file(poisoned, str(root / "nonfinite.safetensors"), metadata=meta)
    wrong = {k: (torch.zeros(3) if i == 0 else v.contiguous()) for i, (k, v) in enumerate(ema.items())}
    save_file(wrong, str(root / "wrong_shape.safetensors"), metadata=meta)
    save_file(
        {k: v.contiguous() for k, v in ema.items()},
        str(root / "bad_meta.safetensors"),
        metadata={**meta, "config": "model: [unclosed"},
    )
    other = load_config(
        None,
        [
            "model.preset=SiT-Nano/4",
            "model.hidden_size=64",
            "model.input_size=[32,32]",
            "model.in_channels=1",
            "model.num_classes=10",
            "model.sprint.fusion=none",
            "model.sprint.path_drop_prob=0",
            "sample.guidance=cfg",
        ],
    )
    save_file(
        {k: v.contiguous() for k, v in ema.items()},
        str(root / "other_arch.safetensors"),
        metadata={**meta, "config": to_yaml(other)},
    )
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "stages_map.yaml").write_text("stages: {name: pre, steps: 2}\n")
    (root / "a_file").write_text("x")
    np.savez(root / "no_arr0.npz", images=np.zeros((4, 32, 32, 1), np.uint8))
    np.savez(root / "float_labels.npz", np.zeros((4, 32, 32, 1), np.uint8), np.array([0.5, 1, 2, 3]))
    np.savez(root / "big_labels.npz", np.zeros((4, 32, 32, 1), np.uint8), np.array([0, 1, 2, 30]))
    np.savez(root / "real.npz", np.zeros((4, 32, 32, 1), np.uint8))
    (root / "latin1.txt").write_bytes("a red bag\nun sac rouge tr\xe8s cher\n".encode("latin-1"))
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
    (
        ["evaluate", "--samples", "{root}/real.npz", "--write-ref", "{root}/missing/ref.npz"],
        "does not exist; create it first",
    ),
    (
        [
            "sparsify",
            "--checkpoint",
            "{root}/other_arch.safetensors",
            "--out",
            "{out}",
            "--pool-depth",
            "1",
            "--modules",
            "1",
            "--sparse-depth",
            "1",
            "--dense-depth",
            "0",
            "--sparse-grid",
            "4",
        ],
        "does not fit this model",
    ),
    (["sparsify", "--checkpoint", "{root}/run", "--out", "{root}/a_file/sparse"], "is under"),
    (["sample", "--checkpoint", "{root}/run", "--out", "{root}/a_file/samples"], "which is a file"),
    (["sample", "--checkpoint", "{root}/run", "--seeds", "0-1000000000"], "gives 1000000001 numbers; at most 100000"),
    (["sample", "--checkpoint", "{root}/run", "--per-label", "1000000000"], "at most 100000"),
    (["sample", "--checkpoint", "{root}/run", "--prompts", "{root}/latin1.txt"], "latin1.txt line 2 is not UTF-8"),
    (["bench", "--preset", "SiT-Nano/4", "--out", "{root}"], "is a folder"),
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/a_file/export"], "which is a file"),
    (["convert", "--from", "dit", "--checkpoint", "{root}/run", "--out", "{root}/a_file/imported"], "which is a file"),
    (["plot", "{root}/run", "--out", "{root}/a_file/chart.png"], "which is a file"),
    (TRAIN + ["--stop-at", "-1"], "--stop-at must be a step >= 1"),
    (["evaluate", "--samples", "{root}/latin1.txt"], "is not an npz file"),
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


OUTPUT_AFTER_WORK = [  # a command whose output path is refused, and the function that would have done its work
    (
        ["sample", "--checkpoint", "{root}/run", "--out", "{root}/a_file/samples"],
        "sprintdit.sampling_run.SamplingRun.generate",
    ),
    (["bench", "--preset", "SiT-Nano/4", "--out", "{root}"], "sprintdit.bench.run_bench"),
    (["evaluate", "--checkpoint", "{root}/run", "--device", "cpu"], "sprintdit.sampling_run.SamplingRun.score"),
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/a_file/export"], "sprintdit.export.load_weights"),
]


@pytest.mark.parametrize("argv,work", OUTPUT_AFTER_WORK, ids=[a[0] for a, _ in OUTPUT_AFTER_WORK])
def test_output_paths_are_checked_before_the_work(world, monkeypatch, capsys, argv, work):
    def never(*args, **kwargs):
        raise AssertionError(f"{work} ran although its output cannot be written")

    monkeypatch.setattr(work, never)
    if argv[0] == "evaluate":  # the checkpoint's folder, where the scores go, turned unwritable
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not str(path).startswith(str(world / "run")))
    assert main([a.format(root=world) for a in argv]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_unwritable_cache_is_skipped_with_one_warning(world, data, tmp_path, monkeypatch, capsys):
    shutil.copy(world / "real.npz", tmp_path / "real.npz")
    monkeypatch.setenv("SPRINTDIT_CACHE", str(world / "a_file" / "cache"))
    assert main(["evaluate", "--samples", str(tmp_path / "real.npz"), "--data-root", str(data), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: cannot write the reference cache") == 1 and "Traceback" not in err
    assert (tmp_path / "real.eval.json").is_file()


def test_damaged_text_inputs_are_one_line_or_skipped_with_a_count(world, tmp_path, capsys):
    from sprintdit.captions import read_captions_jsonl
    from sprintdit.files import read_jsonl

    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(
        b'{"file": "a.png", "caption": "a bag"}\n{"file": "b.png", "caption": "un sac tr\xe8s cher"}\n'
    )
    with pytest.raises(UserError, match=r"captions.jsonl line 2 is not UTF-8 text \(byte 0xe8\)"):
        read_captions_jsonl(captions)
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(
        b"".join(lines[:1] + [b'{"step": 9, "lo\xff', b"\n", b'{"step": 1\n'] + lines[1:])
    )
    assert len(read_jsonl(run / "metrics.jsonl")) == len(lines)
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0  # a folder: the chart goes into it
    out, err = capsys.readouterr()
    assert (tmp_path / "runs.png").is_file() and str(tmp_path / "runs.png") in out
    assert "skipped 2 invalid line(s)" in err and "line 2" in err and "Traceback" not in err


def test_ctrl_c_during_start_up_is_one_line(data, tmp_path, capsys, monkeypatch):
    import sprintdit.training.loop as train

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
