"""One trainer per run folder: RUN/.lock names the process that holds it and is refreshed while that process lives.

The lock file is created atomically (O_EXCL) and holds {"pid", "host", "started"}; a thread touches it every
HEARTBEAT_S seconds. A second trainer is refused with the holder's pid and host. A lock left behind is taken
over (with a note) when its holder is gone: on this host, when no process has its pid; from another host
(a shared file system, e.g. a requeued job on a new node), when it was not refreshed for STALE_S seconds.
Trainers in one process share the lock (a study runs its runs one after another in one process).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # the holder refreshes the lock's modification time this often
STALE_S = 4 * HEARTBEAT_S  # a lock from another host not refreshed for this long has no live holder

_held: dict[Path, "RunLock"] = {}  # locks this process holds, by folder: trainers in one process share them


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock file's content (None if it vanished); unreadable content counts as a holder we cannot name."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        holder = {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        holder = {"pid": -1, "host": "?"}  # being written right now, or damaged
    return {**holder, "age": age}


def _is_live(holder: dict) -> bool:
    if holder["host"] == socket.gethostname() and holder["pid"] > 0:
        return _pid_alive(holder["pid"])
    return holder["age"] < STALE_S  # another host (or a damaged file): trust the heartbeat


class RunLock:
    """The lock of one run folder, held by this process until every trainer that took it released it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.users = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        return True

    def _take(self) -> str | None:
        """Create the lock file, taking over a dead holder's; returns a note about a takeover."""
        for _ in range(3):  # the file may vanish or appear between the checks
            if self._create():
                return None
            holder = _holder(self.path)
            if holder is None:
                continue
            if _is_live(holder):
                raise UserError(
                    f"{self.folder} is in use by another trainer (pid {holder['pid']} on {holder['host']}); wait for it to "
                    f"finish or use another --out (if that process is gone, delete {self.path})"
                )
            stale = self.path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}")
            try:
                os.rename(self.path, stale)  # atomic: of two processes taking over, one wins
            except FileNotFoundError:
                continue
            stale.unlink()
            if self._create():
                return f"note: took over the lock of {self.folder} from pid {holder['pid']} on {holder['host']}, which is no longer running"
        raise UserError(f"could not lock {self.folder}: other processes keep taking {self.path}")

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a full or read-only disk: the next beat tries again
                pass

    def acquire(self) -> str | None:
        note = None
        if self.users == 0:
            note = self._take()
            self.stop.clear()
            self.thread = threading.Thread(target=self._beat, name=f"lock {self.folder}", daemon=True)
            self.thread.start()
        self.users += 1
        return note

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self.stop.set()
        self.thread.join()
        holder = _holder(self.path)
        if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            self.path.unlink(missing_ok=True)
        _held.pop(self.folder, None)


def lock_run(folder: Path) -> tuple[RunLock, str | None]:
    """Lock a run folder (creating it) for this process: (the lock, a note about a takeover or None)."""
    folder = Path(folder).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"run folder {folder} is a file; give --out a folder") from None
    except OSError as err:
        raise UserError(f"cannot create run folder {folder}: {err.strerror}") from None
    lock = _held.setdefault(folder, RunLock(folder))
    try:
        return lock, lock.acquire()
    except OSError as err:
        raise UserError(f"cannot lock run folder {folder}: {err.strerror}") from None
    finally:
        if lock.users == 0:
            _held.pop(folder, None)
