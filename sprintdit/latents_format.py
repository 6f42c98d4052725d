"""The latent folder `sprintdit prepare` writes and `data.LatentDataset` reads (the layout: see sprintdit.prepare):
its format stamp and file names, and opening it with every shard's checksum verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .files import memmap_safetensors, read_format_json, sha256_file

FORMAT = "sprintdit-latents/1"  # the latent folder `sprintdit prepare` writes (layout: see sprintdit.prepare)
MANIFEST = "manifest.json"
SHARD_NAME = "shard_{:05d}.safetensors"


def read_manifest(root: Path) -> dict:
    """The folder's manifest.json (format-checked), with a one-line error naming the command that writes it."""
    return read_format_json(
        root / MANIFEST,
        FORMAT,
        f"no {MANIFEST} in {root}: run `sprintdit prepare --images IMAGES --out {root} --vae VAE` first",
    )


def open_shards(root: Path, manifest: dict) -> list[dict[str, np.ndarray]]:
    """Every shard the manifest lists as memory maps, refused in one line if missing or not its recorded sha256."""
    shards = []
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            raise UserError(
                f"latent shard {path} is missing or corrupt (sha256 differs from {MANIFEST}); re-run the same "
                f"`sprintdit prepare`"
            )
        shards.append(memmap_safetensors(path))
    return shards
