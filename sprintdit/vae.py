"""The image autoencoder of latent diffusion: diffusers' AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema) from a
local folder, never downloaded. Latents are handled UNSCALED here (the raw posterior); the model's data space is
latents * scaling_factor, the factor read from the VAE's own config (0.18215 for the SD VAE).

diffusers is imported only when a VAE is loaded, so the pixel-space path does not need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .files import sha256_file

CONFIG_FILE = "config.json"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DECODE_BATCH = 32  # latents per decoder forward
NO_VAE = (
    f"this run samples latents and names no VAE to decode them (a converted release): pass --vae DIR, e.g. "
    f"{DEFAULT_VAE} downloaded into DIR"
)


def vae_hint(path: str | Path) -> str:
    return f"download {DEFAULT_VAE} ({CONFIG_FILE} and diffusion_pytorch_model.safetensors) into {path}"


def load_vae(path: str | Path, device: torch.device | str = "cpu"):
    """AutoencoderKL from a local folder holding config.json and the weights, in eval mode."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"VAE folder {path} has no {CONFIG_FILE}: {vae_hint(path)}")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the latent (ImageNet) path needs diffusers: pip install 'sprintdit[imagenet]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the VAE in {path} ({str(err).splitlines()[0]}): {vae_hint(path)}") from None
    return vae.to(device).eval().requires_grad_(False)


def config_sha256(path: str | Path) -> str:
    """Fingerprint of the VAE folder's config.json (which VAE encoded a latent set)."""
    return sha256_file(Path(path) / CONFIG_FILE)


def scaling_factor(vae) -> float:
    return float(vae.config.scaling_factor)


def downsample_factor(vae) -> int:
    """Pixels per latent along each side: one halving per encoder block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, F, H, W) -> their frames as images (B F, C, H, W); images pass unchanged."""
    return x.movedim(2, 1).flatten(0, 1) if x.ndim == 5 else x


def images_as_frames(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `frames_as_images` for the batch and frame count of `like`."""
    return x.unflatten(0, (like.shape[0], like.shape[2])).movedim(1, 2) if like.ndim == 5 else x


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> unscaled posterior (mean, std), each (B, C, H/f, W/f) float32; clips
    (B, 3, F, H, W) frame by frame (the image VAE, as Latte) -> (B, C, F, H/f, W/f)."""
    dist = vae.encode(frames_as_images(images).to(vae.device, vae.dtype)).latent_dist
    return images_as_frames(dist.mean.float(), images), images_as_frames(dist.std.float(), images)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float, batch_size: int = DECODE_BATCH) -> torch.Tensor:
    """latents (B, C, h, w) in the model's (scaled) space -> images (B, 3, h*f, w*f) in [-1, 1], float32 on CPU; clips
    (B, C, F, h, w) frame by frame -> (B, 3, F, h*f, w*f)."""
    frames = frames_as_images(latents)
    out = [
        vae.decode((z / scale).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1).cpu()
        for z in frames.split(batch_size)
    ]
    return images_as_frames(torch.cat(out), latents)


def pixel_decoder(data_cfg, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-space samples -> images in [-1, 1]: identity for pixel data, the run's VAE (loaded at first use) for
    latents."""
    if data_cfg.name != "latents":
        return lambda x: x
    loaded = []

    if data_cfg.vae is None:

        def no_decoder(latents: torch.Tensor) -> torch.Tensor:
            raise UserError(NO_VAE)

        return no_decoder

    def to_pixels(latents: torch.Tensor) -> torch.Tensor:
        if not loaded:
            loaded.append(load_vae(data_cfg.vae, device))
        return decode(loaded[0], latents, scaling_factor(loaded[0]))

    return to_pixels
