"""Stopping a training run on a signal without losing it: Ctrl-C (SIGINT), SIGTERM (what SLURM and Kubernetes send
at preemption) and SIGUSR1 (which SLURM can be asked to send ahead of the time limit).

While `StopSignals` is active, a signal never interrupts a training step: it is recorded, the step (forward,
backward, optimizer update, EMA) finishes, and the trainer saves and exits. Only inside `abortable()` (sample
grids and evaluations of a single process) does it raise `StopNow` at once, since those change nothing that
resume needs. Further signals while the checkpoint is written are answered with a note and otherwise ignored,
so the save completes (SIGKILL still ends the process; the previous checkpoint stays valid, see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopNow(Exception):
    """Raised by a stop signal inside `StopSignals.abortable()`."""


class StopSignals:
    """Records the first stop signal while active (a context manager); handlers are restored on exit."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet  # no notes (torchrun's other ranks: rank 0 speaks for them)
        self.signum: int | None = None
        self._abortable = False
        self._saving = False
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.quiet:
            pass
        elif self.signum is None:
            when = (
                "once the checkpoint being written is complete"
                if self._saving
                else "after this step, with a checkpoint"
            )
            print(f"\n{name}: stopping {when}", file=sys.stderr, flush=True)
        elif self._saving:
            print(f"\n{name}: the checkpoint is being written; it finishes in a moment", file=sys.stderr, flush=True)
        else:
            print(f"\n{name}: already stopping ({self.name}); the checkpoint follows", file=sys.stderr, flush=True)
        self.signum = self.signum or signum
        if self._abortable:
            self._abortable = False
            raise StopNow

    @contextlib.contextmanager
    def abortable(self, allowed: bool = True) -> Iterator[None]:
        """A stop signal inside the block (or one already pending) raises StopNow, if `allowed`."""
        if allowed and self.signum is not None:
            raise StopNow
        self._abortable = allowed
        try:
            yield
        finally:
            self._abortable = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
