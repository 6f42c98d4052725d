from .sit import PRESETS, ModelConfig, SiT, resolve_model_config
from .sparsedit import SparseDiT


def build_model(cfg: ModelConfig):
    """The network `cfg.arch` names: SiT (dense or SPRINT) or SparseDiT."""
    return SparseDiT(cfg) if cfg.arch == "sparsedit" else SiT(cfg)


__all__ = ["PRESETS", "ModelConfig", "SiT", "SparseDiT", "build_model", "resolve_model_config"]
