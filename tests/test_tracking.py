"""train.loggers: TensorBoard receives the same scalars as metrics.jsonl and the sample grids; W&B is optional."""

import json
import socket

import pytest

from sprintdit.config import load_config
from sprintdit.errors import UserError
from sprintdit.tracking import online
from sprintdit.training import Trainer


def run_config(fmnist_dir, *extra):
    return load_config(
        "fashion_mnist_sprint",
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "train.batch_size=8",
            "train.log_every=1",
            "train.sample_every=2",
            "train.grid_rows=2",
            "train.grid_columns=2",
            "sample.steps=2",
            "stages=[{name: pre, steps: 2, mask_ratio: 0.75}, {name: ft, steps: 2, mask_ratio: 0}]",
            *extra,
        ],
    )


def test_tensorboard_holds_the_jsonl_scalars_and_the_grids(fmnist_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trainer = Trainer(run_config(fmnist_dir, "train.loggers=[jsonl,tensorboard]"), run, progress=False)
    trainer.fit(stop_at=3)  # a grid at every sample_every steps and at the end of each fit
    Trainer(None, run, progress=False).fit()  # resumed: the writer appends, dropping nothing that was saved
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "train_flops"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in jsonl if key in r], key
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 3, 4] and grids[0].width == 2 * 34 + 2


def test_loggers_are_checked(fmnist_dir, tmp_path):
    with pytest.raises(UserError, match="jsonl is always one of them"):
        run_config(fmnist_dir, "train.loggers=[tensorboard]")
    with pytest.raises(UserError, match="choose from jsonl, tensorboard, wandb"):
        run_config(fmnist_dir, "train.loggers=[jsonl,mlflow]")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install wandb"):
            Trainer(run_config(fmnist_dir, "train.loggers=[jsonl,wandb]"), tmp_path / "w", progress=False).fit()


def test_unreachable_server_means_offline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens
    assert not online(("127.0.0.1", port))
