"""Run directories and checkpoints: safetensors weights carrying their config, atomic writes, resume.

    RUN/config.yaml                          resolved config of the run
    RUN/metrics.jsonl                        one JSON object per logged step
    RUN/samples/step_XXXXXXXX.png            sample grids
    RUN/checkpoints/step_XXXXXXXX/model.safetensors   weights (config YAML in the metadata)
                                 /ema.safetensors     EMA weights (same metadata)
                                 /state.pt            optimizer, scaler, RNG, step, data position

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoints untouched and the partial one invisible; one is deleted by first renaming it out
of the step_* names (atomically), so a deletion cut short never looks like a checkpoint. A checkpoint's step is
the one its weights record, never only its folder's name: a renamed or copied folder is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import RunConfig, from_yaml_text
from .errors import PICKLE_REFUSED, UserError
from .files import atomic_folder, check_new_folder, synced

STEP_DIR = re.compile(r"^step_(\d{8})$")
LEFTOVERS = (".tmp_step_*", ".del_step_*")  # checkpoint writes and deletions that never finished
FILES = ("model.safetensors", "ema.safetensors", "state.pt")
MB = 2**20


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _write_weights(folder: Path, model_state: dict, ema_state: dict, meta: dict) -> None:
    for name, state in zip(FILES[:2], (model_state, ema_state)):
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        synced(folder / name, lambda p, t=tensors: save_file(t, str(p), metadata=meta))


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested dict / list of tensors (a checkpoint's size, near enough)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def write_error(err: OSError, what: str, folder: Path, need: int) -> UserError:
    """One line for a failed write: a full disk says how much to free, a read-only folder says so."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free
        return UserError(
            f"no space left on device: free {max(need - free, 0) // MB + 1} MB in {folder} ({what} needs about "
            f"{need // MB + 1} MB, {free // MB} MB are free); earlier checkpoints are intact, run the same command to "
            f"resume"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {what} into {folder}: {err.strerror}")
    return UserError(f"writing {what} into {folder} failed: {err.strerror or err}")


def clean_leftovers(run_dir: Path) -> None:
    """Remove what killed checkpoint writes and deletions left behind: hidden write and deletion folders, and step
    folders missing a file (cut short by a deletion of an older sprintdit). Only the holder of the run's lock calls
    this, so no live writer's folder is touched."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    incomplete = [p for p in root.iterdir() if STEP_DIR.match(p.name) and not all((p / f).is_file() for f in FILES)]
    for folder in incomplete:
        remove_folder(folder)
    for pattern in LEFTOVERS:
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the step_* names first (atomic), so a kill during the deletion
    leaves a hidden leftover (cleaned at the next start), never a partial checkpoint."""
    hidden = folder.with_name(f".del_{folder.name}_{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(folder, hidden)
    shutil.rmtree(hidden)


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, ema_state: dict, train_state: dict, config_yaml: str, keep_last: int
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep_last`. Non-finite weights are refused
    (so every checkpoint kept is finite); a failed write (full disk, read-only folder) leaves nothing behind."""
    for name, state in (("model", model_state), ("EMA", ema_state)):
        bad = nonfinite_tensors(state)
        if bad:
            raise UserError(
                f"refusing to write checkpoint step {step}: the {name} weights are not finite ({', '.join(bad[:3])}); "
                f"earlier checkpoints are kept"
            )
    root = run_dir / "checkpoints"
    final = step_dir(run_dir, step)
    meta = {"config": config_yaml, "step": str(step), "format": "sprintdit"}
    try:
        with atomic_folder(
            final, replace=remove_folder
        ) as tmp:  # the same step written again (a stop right after a periodic save) replaces it
            _write_weights(tmp, model_state, ema_state, meta)
            synced(tmp / "state.pt", lambda p: torch.save(train_state, p))
    except (
        OSError,
        RuntimeError,
        SafetensorError,
    ) as err:  # torch.save and safetensors report a full disk in their own types
        need = tensor_bytes([model_state, ema_state, train_state])
        if not isinstance(err, OSError):
            if not root.is_dir() or shutil.disk_usage(root).free >= need:
                raise
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise write_error(err, f"checkpoint step {step}", root, need) from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove_folder(old)
    clean_leftovers(run_dir)
    return final


def save_weights_folder(folder: Path, model_state: dict, ema_state: dict, config_yaml: str) -> Path:
    """A checkpoint folder without training state (a sparsified or imported model): config.yaml,
    model.safetensors and ema.safetensors. Written atomically; `sample`, `evaluate` and `train.init_from`
    accept it."""
    folder = check_new_folder(folder, "--out")
    meta = {"config": config_yaml, "step": "0", "format": "sprintdit"}
    try:
        with atomic_folder(folder) as tmp:
            _write_weights(tmp, model_state, ema_state, meta)
            synced(tmp / "config.yaml", lambda p: p.write_text(config_yaml))
    except OSError as err:
        raise write_error(err, folder.name, folder.parent, tensor_bytes([model_state, ema_state])) from None
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first (chosen by step number, not by date or size). A folder
    whose name disagrees with the step its weights record (renamed or copied) is refused in one line."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and all((p / f).is_file() for f in FILES)
    )
    for step, folder in found:
        check_step(folder, step, _metadata(folder / FILES[0]).get("step"), "its weights record")
    return [p for _, p in found]


def check_step(folder: Path, named: int, recorded, source: str) -> None:
    """Refuse a checkpoint folder whose name's step is not the one `source` records (a renamed or copied folder)."""
    if recorded is not None and str(recorded) != str(named):
        raise UserError(
            f"checkpoint folder {folder} is named step {named} but {source} step {recorded} (renamed or copied?); "
            f"move it out of {folder.parent} or give it its own step's name, step_{int(recorded):08d}"
        )


def _metadata(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"checkpoint {path} is corrupt or not a safetensors file ({str(err).splitlines()[0]})"
        ) from None


def read_config(path: Path) -> RunConfig:
    """The run config stored in a sprintdit safetensors file's metadata (the tensors are not read)."""
    meta = _metadata(path)
    if "config" not in meta:
        raise UserError(f"{path} has no sprintdit config in its metadata; import foreign checkpoints with a converter")
    return from_yaml_text(meta["config"], f"the metadata of {path}")


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Weights and the run config stored in a sprintdit safetensors file."""
    cfg = read_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"checkpoint {path} is corrupt or not a safetensors file ({str(err).splitlines()[0]})"
        ) from None
    return state, cfg


def load_state(module: torch.nn.Module, state: dict, source: Path | str) -> None:
    """module.load_state_dict(state), strict, with a one-line error when the tensors do not fit the module."""
    check_state(module, state, source)
    module.load_state_dict(state)


def check_state(module: torch.nn.Module, state: dict, source: Path | str) -> None:
    """A one-line error unless `state` has exactly the module's tensor names and shapes (a module on the meta
    device will do: only shapes are compared)."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]} (another "
            f"architecture or config?)"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise UserError(
            f"{source} does not fit this model: {'; '.join(wrong[:2])} (file vs model; another size or config?)"
        )


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"training state {path} {PICKLE_REFUSED}") from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"training state {path} is corrupt or unreadable ({str(err).splitlines()[0]})") from None


def resolve_weights(target: str | Path, use_ema: bool = True) -> Path:
    """A run folder (its latest checkpoint), a checkpoint folder, or a .safetensors file -> weights file."""
    target = Path(target)
    name = FILES[1] if use_ema else FILES[0]
    if target.is_file():
        return target
    if (target / name).is_file():
        return target / name
    if (target / FILES[0]).is_file() and (target / "config.json").is_file():  # an exported folder: one set of weights
        return target / FILES[0]
    if target.is_dir():
        ckpts = list_checkpoints(target)
        if ckpts:
            return ckpts[-1] / name
        raise UserError(f"{target} holds no complete checkpoint (expected checkpoints/step_XXXXXXXX/{name})")
    raise UserError(
        f"checkpoint {target} does not exist (give a run folder, a checkpoint folder or a .safetensors file)"
    )


def load_model(target: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, run config) rebuilt from a checkpoint alone."""
    from .models import build_model

    path = resolve_weights(target, use_ema)
    state, cfg = load_weights(path)
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(
            f"the weights in {path} are not finite ({', '.join(bad[:3])}): the run diverged; use an earlier checkpoint"
        )
    model = build_model(cfg.model)
    load_state(model, state, path)
    return model.to(device).eval(), cfg
