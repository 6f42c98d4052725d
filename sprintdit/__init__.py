"""sprintdit: token-sparse diffusion transformers (SPRINT, SparseDiT) that train and sample fast.

    import sprintdit
    cfg = sprintdit.load_config("fashion_mnist_sprint")
    sprintdit.train(cfg, out="runs/fm")
    images = sprintdit.Pipeline.from_pretrained("runs/fm")(labels=[0, 1], steps=25)

The names below load on first use, so `import sprintdit` (and `sprintdit --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Pipeline", "RunConfig", "load_config", "train", "__version__"]

if TYPE_CHECKING:
    from .api import Pipeline, train
    from .config import RunConfig, load_config

_HOMES = {"Pipeline": "api", "train": "api", "RunConfig": "config", "load_config": "config"}


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'sprintdit' has no attribute {name!r}")
