"""Training: the loop (`Trainer`) and its components, one concern a module (see loop.py's docstring)."""

from .checkpointer import TrainState
from .loop import Trainer
from .resolve import resolve_run
from .schedules import total_steps

__all__ = ["Trainer", "TrainState", "resolve_run", "total_steps"]
