"""Captioned image data: `captions.jsonl` beside an image folder, and the caption-embedding table `prepare` writes.

`captions.jsonl` holds one JSON object per line, `{"file": "dogs/0001.png", "caption": "a dog on a sofa"}`, the
file relative to the image folder. Treatments, each counted and reported once, never a crash mid-run:
- an image with no line (or a line whose file is not there): skipped;
- an empty caption: the empty text (learned: START alone; t5, clip: the encoder's embedding of "");
- a caption longer than the encoder's limit: truncated, with a warning.

The table (`sprintdit prepare --captions`, for model.text.encoder t5 | clip) is two files in the prepared folder:
- `captions.safetensors`: `embeddings` (M + 1, L, E) float16 with zero rows at padding and `keep` (M + 1, L)
  bool; row 0 is the empty text, row i + 1 the caption of `files[i]`;
- `captions.json` (written last, atomically): format, encoder (kind, folder, config sha256), max_tokens, dim,
  files, captions, truncated count, the safetensors file's sha256.
Images then name their caption by row (the latent shards' `caption` tensor; the image-folder reader by file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, warn
from .files import atomic_write, atomic_write_text, memmap_safetensors, read_format_json, read_utf8, sha256_file
from .images import IMAGE_SUFFIXES

CAPTIONS_FORMAT = "sprintdit-captions/1"
TABLE_FILE, TABLE_INFO = "captions.safetensors", "captions.json"
STORED_DTYPE = torch.float16  # T5-XXL's 120 x 4096 per image: 1 MB in float16


def read_captions_jsonl(path: str | Path) -> dict[str, str]:
    """file (relative to the image folder) -> caption; one-line errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f'captions file {path} does not exist (one JSON object per line: {{"file": ..., "caption": ...}})'
        )
    captions: dict[str, str] = {}
    for number, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file, caption = entry["file"], entry.get("caption", "")
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UserError(f'{path}:{number}: expected {{"file": ..., "caption": ...}}, got {line[:80]!r}') from None
        if not isinstance(file, str) or not isinstance(caption, str):
            raise UserError(f"{path}:{number}: file and caption must be strings")
        if file in captions:
            raise UserError(f"{path}:{number}: {file!r} has a second caption")
        captions[file] = caption.strip()
    if not captions:
        raise UserError(f"captions file {path} holds no captions")
    return captions


def images_under(root: Path) -> list[str]:
    """Every image at any depth under `root` (paths relative to it, sorted)."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def captioned_files(root: Path, captions: dict[str, str], found: list[str], what: str = "image") -> list[str]:
    """Those of `found` (images or clips under `root`, relative paths, sorted) that have a caption; the others are
    counted once."""
    kept = [f for f in found if f in captions]
    if len(kept) < len(found):
        warn(f"{len(found) - len(kept)} of {len(found)} {what}s under {root} have no caption and are skipped")
    missing = len(set(captions) - set(found))
    if missing:
        warn(f"{missing} captioned files are not {what}s under {root} and are ignored")
    if not kept:
        raise UserError(f"no {what} under {root} has a caption (keys of the captions file are paths relative to it)")
    return kept


class LearnedCaptions:
    """Captions for the learned encoder: token ids over the captions' own vocabulary (sprintdit.text)."""

    def __init__(self, captions: list[str]):
        from .text import tokenize, vocabulary_of, words_of

        self.vocabulary = vocabulary_of(captions)
        self.max_tokens = 1 + max(1, max(len(words_of(c)) for c in captions))  # START + the longest caption
        self.ids = torch.tensor([tokenize(c, self.vocabulary, self.max_tokens) for c in captions])  # (M, L)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """(B, L) token ids of caption rows."""
        return self.ids[torch.from_numpy(np.asarray(rows))]


@dataclass
class CaptionTable:
    """A prepared caption-embedding table, read with memory maps (see the module doc for the layout)."""

    folder: Path
    encoder: str  # t5 | clip
    path: str  # the encoder's folder
    max_tokens: int
    dim: int
    files: list[str]
    captions: list[str]
    embeddings: np.ndarray  # (M + 1, L, E) float16 memory map
    keep: np.ndarray  # (M + 1, L) bool

    @classmethod
    def open(cls, folder: str | Path) -> "CaptionTable":
        folder = Path(folder)
        info = read_format_json(
            folder / TABLE_INFO,
            CAPTIONS_FORMAT,
            f"no {TABLE_INFO} in {folder}: run `sprintdit prepare --captions CAPTIONS.jsonl --text-encoder-path FOLDER "
            f"--out {folder}` first",
        )
        if sha256_file(folder / TABLE_FILE) != info["sha256"]:
            raise UserError(
                f"{folder / TABLE_FILE} is corrupt (sha256 differs from {TABLE_INFO}); re-run the same `sprintdit "
                f"prepare --captions`"
            )
        arrays = memmap_safetensors(folder / TABLE_FILE)
        return cls(
            folder,
            info["encoder"]["kind"],
            info["encoder"]["path"],
            info["max_tokens"],
            info["dim"],
            info["files"],
            info["captions"],
            arrays["embeddings"],
            arrays["keep"],
        )

    def rows_by_file(self) -> dict[str, int]:
        """image file -> its table row."""
        return {f: i + 1 for i, f in enumerate(self.files)}

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """(B, L, E) float32 embeddings of table rows, zero at padding."""
        return torch.from_numpy(np.stack([self.embeddings[r] for r in rows])).float()

    @property
    def empty(self) -> torch.Tensor:
        """(L, E) float32: the empty text's embedding."""
        return self.rows(np.array([0]))[0]


def write_caption_table(out: Path, files: list[str], captions: list[str], encoder) -> Path:
    """Encode "" and every caption with `encoder` (a text_encoders.PretrainedTextEncoder) into `out`'s table."""
    from safetensors.torch import save_file

    embeddings, keep = encoder([""] + list(captions))  # (M + 1, L, E), (M + 1, L)
    tensors = {"embeddings": embeddings.to(STORED_DTYPE).contiguous(), "keep": keep.contiguous()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / TABLE_FILE, lambda p: save_file(tensors, str(p)))
    info = {
        "format": CAPTIONS_FORMAT,
        "encoder": {
            "kind": encoder.kind,
            "path": str(Path(encoder.folder).resolve()),
            "config_sha256": sha256_file(Path(encoder.folder) / "config.json"),
        },
        "max_tokens": encoder.max_tokens,
        "dim": encoder.dim,
        "dtype": "float16",
        "truncated": sum(n > encoder.max_tokens for n in encoder.token_counts(captions)),
        "files": list(files),
        "captions": list(captions),
        "sha256": sha256_file(out / TABLE_FILE),
    }
    atomic_write_text(out / TABLE_INFO, json.dumps(info, indent=1) + "\n")
    return out / TABLE_INFO


def caption_table_matches(out: Path, files: list[str], captions: list[str], encoder) -> bool:
    """Whether `out` already holds this table, intact (prepare then keeps it)."""
    try:
        table = CaptionTable.open(out)
    except UserError:
        return False
    return (table.files, table.captions, table.max_tokens, table.encoder, table.path) == (
        list(files),
        list(captions),
        encoder.max_tokens,
        encoder.kind,
        str(Path(encoder.folder).resolve()),
    )
