"""Experiment tracking beside metrics.jsonl: TensorBoard and Weights & Biases (`train.loggers`).

metrics.jsonl is always written and stays the source of truth (resume, `sprintdit plot` and studies read it);
the other loggers receive the same numeric records (loss, lr, grad norm, steps/s, img/s, training FLOPs and
seconds, evaluation metrics) and every sample grid as an image. Both are optional extras
(`pip install 'sprintdit[tracking]'`). TensorBoard writes RUN/tensorboard and, on resume, drops the events a
stopped run logged after its checkpoint (purge_step); W&B keeps one run id per run folder (RUN/wandb_id, resumed
with it) and runs offline when its server cannot be reached (sync later with `wandb sync RUN/wandb`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from .errors import UserError

WANDB_HOST = ("api.wandb.ai", 443)
REACH_TIMEOUT_S = 3.0


def numeric(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def online(host: tuple[str, int] = WANDB_HOST) -> bool:
    try:
        socket.create_connection(host, timeout=REACH_TIMEOUT_S).close()
        return True
    except OSError:
        return False


class Tracker:
    """The optional loggers of one run (rank 0 only); metrics.jsonl itself is written by the trainer."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, step: int):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.loggers has tensorboard but it is not installed: pip install tensorboard (or "
                    "sprintdit[tracking])"
                ) from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "train.loggers has wandb but it is not installed: pip install wandb (or sprintdit[tracking])"
                ) from None
            id_file = run_dir / "wandb_id"
            if not id_file.is_file():
                id_file.write_text(wandb.util.generate_id())
            mode = os.environ.get("WANDB_MODE") or ("online" if online() else "offline")
            if mode == "offline":
                print(
                    f"note: W&B runs offline (no connection to {WANDB_HOST[0]}); sync later with `wandb sync "
                    f"{run_dir / 'wandb'}`",
                    file=sys.stderr,
                )
            self.wandb = wandb.init(
                id=id_file.read_text().strip(),
                resume="allow",
                dir=str(run_dir),
                name=run_dir.name,
                config=config,
                mode=mode,
            )

    def scalars(self, record: dict) -> None:
        values, step = numeric(record), record["step"]
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG written by the trainer (a sample grid)."""
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            self.tensorboard.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
