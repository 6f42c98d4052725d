"""Files that a crash never leaves half-written: atomic file and folder writes (written under a hidden name,
fsynced, renamed into place), output paths checked before the work that fills them, text and JSON-lines reading
that names the file and line of bad bytes, file checksums, format-stamped JSON and memory-mapped safetensors
reading. Every writer in sprintdit goes through here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import UserError, warn

HASH_CHUNK = 1 << 24  # bytes read at a time when hashing a file
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "BOOL": np.bool_}
HEADER_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian uint64


def synced(path: Path, write: Callable[[Path], None]) -> Path:
    """write(path), then fsync the file (its bytes reach the disk before anything is renamed onto them)."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through write(tmp) into a hidden sibling, then rename it into place; a failure removes the
    partial file and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_npz(path: str | Path, *positional, **arrays) -> Path:
    """np.savez to exactly `path` (np.savez itself appends .npz to names without it)."""

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, *positional, **arrays)

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_folder(final: Path, replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; when the block succeeds it becomes `final` (an existing one
    is first removed by `replace`, if given), when it fails it is removed. Files written inside should go through
    `synced`."""
    final = Path(final)
    tmp = final.parent / f".tmp_{final.name}_{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        if replace is not None and final.exists():
            replace(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_format_json(path: Path, fmt: str, missing: str) -> dict:
    """A JSON file that names its format (a manifest); `missing` is the one-line error when it is not there."""
    if not path.is_file():
        raise UserError(missing)
    try:
        info = json.loads(read_utf8(path))
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} file")
    return info


def read_utf8(path: str | Path) -> str:
    """A text file's content; bad bytes or an unreadable file are one line naming the file (and the line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path} line {line} is not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines log, one per line (none when the file is missing). A torn, invalid or
    non-UTF-8 line (a kill mid-write, an edit) is skipped with one warning that counts them and names the first."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        warn(f"skipped {len(bad)} invalid line(s) of {path} (the first: line {bad[0]})")
    return records


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """Refuse, before any work, an output folder that could not be written: an existing file in its place or above
    it, or a folder (its nearest existing one) this process cannot write into."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file; give a folder")
    return _check_ancestors(folder, folder, what)


def _check_ancestors(path: Path, folder: Path, what: str) -> Path:
    """`path` can be written when the nearest existing one of `folder` and the folders above it is a writable folder."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())
    if not existing.is_dir():
        raise UserError(f"{what} {path} is under {existing}, which is a file; give a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write into {existing} (permission denied or a read-only file system)")
    return path


def check_new_folder(folder: str | Path, what: str) -> Path:
    """Refuse, before any work, an output folder that exists already or could not be written (check_writable_folder)."""
    folder = Path(folder)
    if folder.exists() and folder.is_dir():
        raise UserError(f"{what} {folder} already exists; choose a new one")
    return check_writable_folder(folder, what)


def check_writable_file(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output file that could not be written: a folder in its place, or a parent that
    check_writable_folder refuses."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    return _check_ancestors(path, path.parent, what)


def memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (random access without loading the file)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(HEADER_BYTES), "little")
        header = json.loads(f.read(size))
    start = HEADER_BYTES + size
    return {
        name: np.memmap(
            path,
            dtype=SAFETENSORS_DTYPES[info["dtype"]],
            mode="r",
            offset=start + info["data_offsets"][0],
            shape=tuple(info["shape"]),
        )
        for name, info in header.items()
        if name != "__metadata__"
    }
