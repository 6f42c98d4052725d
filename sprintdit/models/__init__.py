from .sit import PRESETS, ModelConfig, SiT, resolve_model_config

__all__ = ["PRESETS", "ModelConfig", "SiT", "resolve_model_config"]
