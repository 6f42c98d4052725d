"""One trainer per run folder: RUN/.lock names the process that holds it and is refreshed while that process lives.

The lock file holds {"pid", "host", "started"} and appears atomically with its whole content (written to a hidden
file, then hard-linked into place; O_EXCL where a file system has no hard links), so a lock that cannot be written
is not taken and leaves nothing. A thread touches it every HEARTBEAT_S seconds. A second trainer is refused with the
holder's pid and host. A lock left behind is taken over (with a note) when its holder is gone: on this host, when
no process has its pid; from another host (a shared file system, e.g. a requeued job on a new node), when it was not
refreshed for STALE_S seconds; at once when its content names no holder (empty or damaged). Releasing never raises
(a folder turned read-only keeps its lock, which the next start takes over). Trainers in one process share the
lock (a study runs its runs one after another in one process).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import UserError

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


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)  # os.link's answers on such file systems


def _holder(path: Path) -> dict | None:
    """The lock file's content (None if it vanished); content that names no holder (an empty or damaged file) has
    pid None."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        holder = {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        holder = {"pid": None, "host": None}  # a lock is never visible half-written: this one is damaged
    return {**holder, "age": age}


def _is_live(holder: dict) -> bool:
    if holder["pid"] is None:
        return False
    if (
        holder["host"] == socket.gethostname() and holder["pid"] > 0
    ):  # this process's own, when it holds no lock here: left by a failed release
        return holder["pid"] != os.getpid() and _pid_alive(holder["pid"])
    return holder["age"] < STALE_S  # another host: trust the heartbeat


def _describe(holder: dict) -> str:
    return (
        "an empty or damaged lock"
        if holder["pid"] is None
        else f"pid {holder['pid']} on {holder['host']}, which no longer holds it"
    )


class RunLock:
    """The lock of one run folder, held by this process until every trainer that took it released it."""

    def __init__(self, folder: Path, created: list[Path]):
        self.folder = folder
        self.created = created  # the folders lock_run made, deepest first: removed at release if still empty
        self.path = folder / LOCK_NAME
        self.users = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _create(self) -> bool:
        """Make the lock file with its whole content, or nothing (False when another holds it)."""
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        new = self.path.with_name(f"{LOCK_NAME}.new.{socket.gethostname()}.{os.getpid()}")
        try:
            new.write_text(content)
            try:
                os.link(new, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in NO_HARD_LINKS:
                    raise
            return self._create_exclusive(content)
        finally:
            new.unlink(missing_ok=True)

    def _create_exclusive(self, content: str) -> bool:
        """_create on a file system without hard links: O_EXCL, and the file removed if its content cannot be
        written."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(content)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
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
                    f"{self.folder} is in use by another trainer (pid {holder['pid']} on {holder['host']}); wait for "
                    f"it to "
                    f"finish or use another --out (if that process is gone, delete {self.path})"
                )
            stale = self.path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}")
            try:
                os.rename(self.path, stale)  # atomic: of two processes taking over, one wins
            except FileNotFoundError:
                continue
            stale.unlink()
            if self._create():
                return f"note: took over the lock of {self.folder} from {_describe(holder)}"
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

    def release(self) -> str | None:
        """Give the lock up (when its last user in this process does); never raises over the error a run may be ending
        with: returns a note when the lock file could not be removed."""
        self.users -= 1
        if self.users > 0:
            return None
        self.stop.set()
        self.thread.join()
        _held.pop(self.folder, None)
        try:
            holder = _holder(self.path)
            if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
                self.path.unlink(missing_ok=True)
        except OSError as err:
            return f"note: could not remove {self.path} ({err.strerror or err}); the next start takes it over"
        finally:
            for folder in self.created:  # a start that failed before writing anything leaves no folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return None


def lock_run(folder: Path) -> tuple[RunLock, str | None]:
    """Lock a run folder (creating it) for this process: (the lock, a note about a takeover or None)."""
    folder = Path(folder).resolve()
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"run folder {folder} is a file; give --out a folder") from None
    except OSError as err:
        raise UserError(f"cannot create run folder {folder}: {err.strerror}") from None
    lock = _held.setdefault(folder, RunLock(folder, created))
    try:
        return lock, lock.acquire()
    except OSError as err:
        raise UserError(f"cannot lock run folder {folder}: {err.strerror}") from None
    finally:
        if lock.users == 0:
            _held.pop(folder, None)
            for made in created:
                with contextlib.suppress(OSError):
                    made.rmdir()
