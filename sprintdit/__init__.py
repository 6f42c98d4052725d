"""sprintdit: token-sparse diffusion transformers (SPRINT, SparseDiT) that train and sample fast."""

__version__ = "0.1.0"
