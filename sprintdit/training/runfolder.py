"""A run folder and everything in it a trainer reads and writes (layout: see sprintdit.checkpoint).

`RunFolder.check` decides, without writing, which config a folder trains with; `take` locks it (sprintdit.runlock),
writes config.yaml and removes the leftovers of killed checkpoint writes; `log` appends one strict-JSON line to
metrics.jsonl (non-finite numbers become null) and `trim` drops what a stopped run logged after its checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import RunConfig, from_yaml_text, to_yaml
from ..errors import UserError
from ..files import atomic_write_text, read_jsonl, read_utf8
from .runlock import RunLock, lock_run


def config_diff(old: RunConfig, new: RunConfig) -> str:
    """The first differing lines of two configs but for the sections a resumed run may change (sample, eval,
    distributed); empty when they agree."""
    a = to_yaml(replace(old, sample=new.sample, eval=new.eval, distributed=new.distributed)).splitlines()
    b = to_yaml(new).splitlines()
    return "; ".join([f"{x.strip()} -> {y.strip()}" for x, y in zip(a, b) if x != y][:3]) if a != b else ""


def check_folder(run_dir: Path, cfg: RunConfig | None) -> tuple[RunConfig, str | None]:
    """(the config to train `run_dir` with, a note or None); reads, never writes.

    `cfg` None resumes with the folder's saved config. The config must match config.yaml and the one every checkpoint
    was written with (the weights' own metadata, so a missing config.yaml or a step folder copied from another run is
    caught). A folder with no checkpoint holds no training yet: another config starts it afresh."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file; give --out a folder")
    saved_path = run_dir / "config.yaml"
    saved = [(from_yaml_text(read_utf8(saved_path), str(saved_path)), str(saved_path))] if saved_path.is_file() else []
    latest = ckpt.list_checkpoints(run_dir)
    saved += [(ckpt.read_config(folder / ckpt.FILES[0]), str(folder)) for folder in reversed(latest)]  # metadata only
    note = None
    if cfg is None:
        if not saved:
            raise UserError(
                f"{run_dir} is not a run folder (no config.yaml, no checkpoint); pass --config to start a run"
            )
        cfg = saved[0][0]
    for old, source in saved:
        diff = config_diff(old, cfg)
        if diff and latest:
            raise UserError(f"{source} was written with another config ({diff}); use a new --out or the same config")
        if diff:
            note = f"note: {run_dir} has no checkpoint yet; starting it afresh with this config ({diff})"
    return cfg, note


def write_run_config(run_dir: Path, cfg: RunConfig) -> None:
    """RUN/config.yaml, written atomically (by the holder of the run's lock)."""
    try:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    except OSError as err:
        raise ckpt.write_error(err, "config.yaml", run_dir, len(to_yaml(cfg))) from None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock: RunLock | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def grid_path(self, step: int) -> Path:
        return self.path / "samples" / f"step_{step:08d}.png"

    def checkpoints(self) -> list[Path]:
        return ckpt.list_checkpoints(self.path)

    def check(self, cfg: RunConfig | None) -> tuple[RunConfig, str | None]:
        return check_folder(self.path, cfg)

    def take(self, cfg: RunConfig) -> None:
        """Lock the folder, check it again (it may have changed while the trainer was built), write config.yaml and
        remove what killed checkpoint writes left behind. Rank 0 only."""
        self.hold()
        note = self.check(cfg)[1]
        if note:
            print(note, file=sys.stderr)
        write_run_config(self.path, cfg)
        ckpt.clean_leftovers(self.path)

    def hold(self) -> None:
        if self.lock is None:
            self.lock, note = lock_run(self.path)
            if note:
                print(note, file=sys.stderr)

    def release(self) -> None:
        if self.lock is not None:
            note = self.lock.release()
            self.lock = None
            if note:
                print(note, file=sys.stderr)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def has_evaluation(self, step: int) -> bool:
        return any(r.get("step") == step and "eval_samples" in r for r in self.metrics())

    def log(self, record: dict) -> dict:
        """Append one strict-JSON line; returns the record as written (non-finite numbers as None)."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as err:
            raise ckpt.write_error(err, "metrics.jsonl", self.path, ckpt.MB) from None
        return record

    def trim(self, step: int) -> None:
        """Drop the metrics lines logged after `step` by a run that stopped (and a line cut short by a kill)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in read_jsonl(self.metrics_path) if isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
