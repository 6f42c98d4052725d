"""Files that a crash never leaves half-written: atomic file and folder writes (written under a hidden name,
fsynced, renamed into place), file checksums, format-stamped JSON and memory-mapped safetensors reading. Every writer in sprintdit goes through here."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

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
def atomic_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; when the block succeeds it becomes `final` (an existing one
    is replaced if `replace`), when it fails it is removed. Files written inside should go through `synced`."""
    final = Path(final)
    tmp = final.parent / f".tmp_{final.name}_{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
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
    from .errors import UserError

    if not path.is_file():
        raise UserError(missing)
    info = json.loads(path.read_text())
    if info.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} file")
    return info



def memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (random access without loading the file)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(HEADER_BYTES), "little")
        header = json.loads(f.read(size))
    start = HEADER_BYTES + size
    return {
        name: np.memmap(path, dtype=SAFETENSORS_DTYPES[info["dtype"]], mode="r", offset=start + info["data_offsets"][0], shape=tuple(info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }
