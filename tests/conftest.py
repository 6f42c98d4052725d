import gzip
import struct

import numpy as np
import pytest
import torch

from sprintdit.models import ModelConfig, SiT
from sprintdit.models.sit import SprintConfig

DENSE = SprintConfig(fusion="none", path_drop_prob=0.0)  # no SPRINT fusion or path drop: a dense SiT


def write_idx(path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def fmnist_dir(tmp_path):
    """A tiny stand-in for the Fashion-MNIST IDX files: 40 train and 20 test 28x28 images, 10 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x0803)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x0801)
    return root


def tiny_vae(folder, sample_size: int, latent_channels: int = 4, scaling_factor: float = 0.18215):
    """A random two-block AutoencoderKL (one halving: latents are half the image side) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=sample_size, scaling_factor=scaling_factor,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        preset="SiT-Nano/4", input_size=[16, 16], in_channels=2, num_classes=5, depth=6, hidden_size=32, num_heads=2
    )
    return ModelConfig(**{**base, **overrides})


def perturbed_model(dtype=torch.float64, seed=0, **overrides) -> SiT:
    """A tiny model with every parameter random (adaLN-Zero init would hide most bugs)."""
    torch.manual_seed(seed)
    model = SiT(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def tiny_inputs(model: SiT, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return x, t, y


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random (but activations kept of order one), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias", "gamma", "token", "pos_embed")):
                tensor.normal_(0, 0.1)
            elif name.endswith("bn.weight"):
                tensor.uniform_(0.5, 1.5)
    return model.eval()
