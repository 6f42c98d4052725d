"""Turn a dense DiT/SiT checkpoint into a SparseDiT checkpoint folder (`sprintdit sparsify`, and study runs)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import check_state, load_weights, resolve_weights, save_weights_folder
from .config import to_yaml
from .density import SparseConfig
from .errors import UserError
from .files import check_new_folder
from .flops import forward_flops, mean_forward_flops
from .models import SparseDiT, build_model, resolve_model_config
from .models.sparsedit import sparsify_state_dict


@dataclass
class Sparsified:
    folder: Path  # config.yaml, model.safetensors, ema.safetensors
    source: Path  # the weights file it was built from
    config: object  # the SparseDiT's ModelConfig
    flops_ratio: float  # its forward FLOPs (averaged over t) / the dense model's


def sparsify(checkpoint: str | Path, out: str | Path, layout: SparseConfig, use_ema: bool = True) -> Sparsified:
    """Build a SparseDiT with `layout` from a dense model (run folder, checkpoint folder or .safetensors) and write
    it to the new folder `out`. Block i inherits dense block i (see `sparsify_state_dict`); the run's sampling
    settings come along, PDG replaced by CFG (SparseDiT has no SPRINT dense path)."""
    check_new_folder(out, "--out")
    path = resolve_weights(checkpoint, use_ema=use_ema)
    state, run = load_weights(path)
    dense = run.model
    if dense.arch != "sit" or dense.sprint.fusion != "none":
        raise UserError(
            f"{path} is not a dense DiT/SiT (arch {dense.arch}, fusion {dense.sprint.fusion}); SparseDiT starts from a "
            f"dense model"
        )
    with torch.device("meta"):  # shapes only
        check_state(build_model(dense), state, path)
    sparse_cfg = resolve_model_config(replace(dense, arch="sparsedit", sparse=layout))
    sparse_state = sparsify_state_dict(state, sparse_cfg)
    SparseDiT(sparse_cfg).load_state_dict(sparse_state)  # the mapping covers the whole network
    sample = replace(run.sample, guidance="cfg") if run.sample.guidance == "pdg" else run.sample
    folder = save_weights_folder(
        Path(out), sparse_state, sparse_state, to_yaml(replace(run, model=sparse_cfg, sample=sample))
    )
    return Sparsified(folder, path, sparse_cfg, mean_forward_flops(sparse_cfg, 1) / forward_flops(dense, 1))
