"""Run directories and checkpoints: safetensors weights carrying their config, atomic writes, resume.

    RUN/config.yaml                          resolved config of the run
    RUN/metrics.jsonl                        one JSON object per logged step
    RUN/samples/step_XXXXXXXX.png            sample grids
    RUN/checkpoints/step_XXXXXXXX/model.safetensors   weights (config YAML in the metadata)
                                 /ema.safetensors     EMA weights (same metadata)
                                 /state.pt            optimizer, scaler, RNG, step, data position

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoints untouched and the partial one invisible.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig, from_yaml_text
from .errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "ema.safetensors", "state.pt")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _fsync_write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model_state: dict, ema_state: dict, train_state: dict, config_yaml: str, keep_last: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"config": config_yaml, "step": str(step), "format": "sprintdit"}
    for name, state in (("model.safetensors", model_state), ("ema.safetensors", ema_state)):
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        _fsync_write(tmp / name, lambda p, t=tensors: save_file(t, str(p), metadata=meta))
    _fsync_write(tmp / "state.pt", lambda p: torch.save(train_state, p))
    final = step_dir(run_dir, step)
    if final.exists():  # the same step written again (e.g. an interrupt right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp_step_*"):  # left behind by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_weights_folder(folder: Path, model_state: dict, ema_state: dict, config_yaml: str) -> Path:
    """A checkpoint folder without training state (a sparsified or imported model): config.yaml,
    model.safetensors and ema.safetensors. Written atomically; `sample`, `evaluate` and `train.init_from`
    accept it."""
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"{folder} already exists; choose a new --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp_{folder.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"config": config_yaml, "step": "0", "format": "sprintdit"}
    for name, state in zip(FILES[:2], (model_state, ema_state)):
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        _fsync_write(tmp / name, lambda p, t=tensors: save_file(t, str(p), metadata=meta))
    _fsync_write(tmp / "config.yaml", lambda p: p.write_text(config_yaml))
    os.rename(tmp, folder)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first (chosen by step number, not by date or size)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Weights and the run config stored in a sprintdit safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(err).splitlines()[0]})") from None
    if "config" not in meta:
        raise UserError(f"{path} has no sprintdit config in its metadata; import foreign checkpoints with a converter")
    return state, from_yaml_text(meta["config"], f"the metadata of {path}")


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
    if target.is_dir():
        ckpts = list_checkpoints(target)
        if ckpts:
            return ckpts[-1] / name
        raise UserError(f"{target} holds no complete checkpoint (expected checkpoints/step_XXXXXXXX/{name})")
    raise UserError(f"checkpoint {target} does not exist (give a run folder, a checkpoint folder or a .safetensors file)")


def load_model(target: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, run config) rebuilt from a checkpoint alone."""
    from .models import build_model

    path = resolve_weights(target, use_ema)
    state, cfg = load_weights(path)
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match its own config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), cfg
