"""Shared plumbing for the metric feature networks: safe loading of third-party state dicts, with one-line
`UserError`s, and the image-batch check.

Only tensors are ever deserialised: `.safetensors` files through safetensors, anything else through
`torch.load(..., weights_only=True)`. Nothing is downloaded; a missing file or a state dict whose keys or
shapes differ from the network is reported in one line that ends with a hint on which file to get and which
option to pass.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import PICKLE_REFUSED, UserError

SAFETENSORS_SUFFIX = ".safetensors"
KEYS_SHOWN = 3  # keys listed per kind of mismatch before "+N more"
RGB, GRAY = 3, 1  # image channel counts the networks accept (grayscale is repeated to RGB)
IGNORED_SUFFIXES = (
    "num_batches_tracked",
)  # BatchNorm step counters: absent from converted checkpoints, unused in eval
WRAPPER_PREFIXES = ("module.",)  # left by DataParallel / DistributedDataParallel


def one_line(text: str) -> str:
    """The first line of a message, so that a `UserError` built from it stays a single line."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def read_state_dict(path: str | Path | None, hint: str) -> dict[str, torch.Tensor]:
    """The tensors stored at `path`, on the CPU; `hint` says which file to get and which option to pass."""
    if path is None or str(path) == "":
        raise UserError(f"no weights file given: {hint}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} is missing: {hint}")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"weights file {path} {PICKLE_REFUSED}: {hint}") from None
    except Exception as error:  # any other unreadable file ends in the same one-line message
        raise UserError(f"cannot read weights {path} ({type(error).__name__}: {one_line(error)}): {hint}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a flat state dict of tensors: {hint}")
    return {strip_wrapper(key): value for key, value in state.items()}


def strip_wrapper(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def brief(keys: list[str]) -> str:
    """At most KEYS_SHOWN sorted keys, then how many more there are."""
    keys = sorted(keys)
    shown = ", ".join(keys[:KEYS_SHOWN])
    return shown + (f" +{len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else "")


def ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


def mismatch_report(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Empty when the keys (ignoring IGNORED_SUFFIXES) and shapes agree, else e.g. `missing: a, b; unexpected: c`."""
    want = {k for k in expected if not ignored(k)}
    have = {k for k in found if not ignored(k)}
    wrong_shape = [
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(want & have)
        if found[k].shape != expected[k].shape
    ]
    parts = []
    if want - have:
        parts.append(f"missing: {brief(list(want - have))}")
    if have - want:
        parts.append(f"unexpected: {brief(list(have - want))}")
    if wrong_shape:
        parts.append(f"wrong shape: {brief(wrong_shape)}")
    return "; ".join(parts)


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, hint: str) -> None:
    """Copy `state` into `model` after checking that every key and shape matches (BatchNorm counters aside)."""
    report = mismatch_report(model.state_dict(), state)
    if report:
        raise UserError(f"weights {path} do not fit {type(model).__name__} ({report}): {hint}")
    model.load_state_dict({k: v for k, v in state.items() if not ignored(k)}, strict=False)


def check_images(images: torch.Tensor, network: str) -> None:
    """Raise a UserError unless `images` is a non-empty batch (N, 3 or 1, H, W)."""
    if images.ndim != 4 or images.shape[1] not in (RGB, GRAY) or images.shape[0] == 0:
        raise UserError(
            f"{network} takes a non-empty batch of images (N, 3, H, W) or (N, 1, H, W) in [0, 255], got "
            f"{tuple(images.shape)}"
        )
