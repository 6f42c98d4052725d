"""Turn a dense DiT/SiT checkpoint (trained here or imported) into a token-sparse one: a SparseDiT (`sprintdit
sparsify`, and study runs) or the same network with SPRINT's sparse-dense fusion added for a token-sparse fine-tune
(`sprintdit adapt`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import check_state, load_weights, resolve_weights, save_weights_folder
from .config import RunConfig, to_yaml
from .density import SparseConfig
from .errors import UserError
from .files import check_new_folder
from .flops import forward_flops, mean_forward_flops
from .models import SparseDiT, build_model, resolve_model_config
from .models.sparsedit import sparsify_state_dict
from .sections import SprintConfig


def load_dense(checkpoint: str | Path, use_ema: bool, what: str) -> tuple[Path, dict, RunConfig]:
    """(weights file, its tensors, its run config) of a dense DiT/SiT, checked against its architecture."""
    path = resolve_weights(checkpoint, use_ema=use_ema)
    state, run = load_weights(path)
    dense = run.model
    if dense.arch != "sit" or dense.sprint.fusion != "none":
        raise UserError(
            f"{path} is not a dense DiT/SiT (arch {dense.arch}, fusion {dense.sprint.fusion}); {what} starts from a "
            f"dense model"
        )
    with torch.device("meta"):  # shapes only
        check_state(build_model(dense), state, path)
    return path, state, run


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
    path, state, run = load_dense(checkpoint, use_ema, "SparseDiT")
    dense = run.model
    sparse_cfg = resolve_model_config(replace(dense, arch="sparsedit", sparse=layout))
    sparse_state = sparsify_state_dict(state, sparse_cfg)
    SparseDiT(sparse_cfg).load_state_dict(sparse_state)  # the mapping covers the whole network
    sample = replace(run.sample, guidance="cfg") if run.sample.guidance == "pdg" else run.sample
    folder = save_weights_folder(
        Path(out), sparse_state, sparse_state, to_yaml(replace(run, model=sparse_cfg, sample=sample))
    )
    return Sparsified(folder, path, sparse_cfg, mean_forward_flops(sparse_cfg, 1) / forward_flops(dense, 1))


def adapt(checkpoint: str | Path, out: str | Path, sprint: SprintConfig, use_ema: bool = True) -> Path:
    """Add SPRINT's fusion to a dense model (run folder, checkpoint folder or .safetensors) and write the new folder
    `out`: blocks split into encoder / middle / decoder by `sprint`, the fusion Linear on [sparse, dense] initialised
    to [I, 0] with zero bias, so with every token kept the network computes exactly what the source does; a masked
    fine-tune (train.init_from) then teaches the middle to work on a token subset and the fusion to use the dense
    path, and path drop (sprint.path_drop_prob) teaches the path-dropped pass that Path-Drop Guidance runs. The
    run's sampling settings come along."""
    check_new_folder(out, "--out")
    if sprint.fusion != "concat_linear":
        raise UserError(f"adapt adds SPRINT's fusion: sprint.fusion must be concat_linear, got {sprint.fusion!r}")
    path, state, run = load_dense(checkpoint, use_ema, "the SPRINT adapter")
    cfg = resolve_model_config(replace(run.model, sprint=sprint))
    d = cfg.hidden_size
    weight = torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1)  # (D, 2D): fusion([sparse, dense]) = sparse
    adapted = {**state, "fusion.weight": weight, "fusion.bias": torch.zeros(d)}
    with torch.device("meta"):
        check_state(build_model(cfg), adapted, path)
    return save_weights_folder(Path(out), adapted, adapted, to_yaml(replace(run, model=cfg)))
