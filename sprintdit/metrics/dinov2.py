"""DINOv2 vision transformers (ViT-S/B/L/g, patch 14) as feature networks for the Frechet DINOv2 distance
(FD_DINOv2 / FDD, as in dgm-eval and later papers such as RAE) and other feature-space metrics.

Layout: the official facebookresearch/dinov2 checkpoint keys, e.g. `dinov2_vitl14_pretrain.pth`:
- `cls_token` (1, 1, D); `pos_embed` (1, 1 + 37 * 37, D), trained at 518x518 and interpolated bicubically to
  the input's patch grid (with DINOv2's +0.1 offset in the scale factor, so the sampling matches theirs);
  `mask_token` (1, D), loaded but unused at inference; `patch_embed.proj` Conv2d(3, D, 14, stride 14);
- `blocks.{i}.norm1`, `.attn.qkv` Linear(D, 3D), `.attn.proj` Linear(D, D), `.ls1.gamma` (D,), `.norm2`,
  `.mlp.fc1` Linear(D, 4D) -> GELU -> `.mlp.fc2` Linear(4D, D), `.ls2.gamma` (D,); pre-norm residual blocks
  x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)); ViT-g instead has a SwiGLU MLP `.mlp.w12`
  Linear(D, 2H) and `.mlp.w3` Linear(H, D) with H = 4096;
- `norm`: the final LayerNorm; every LayerNorm has eps 1e-6.
The checkpoints without registers are supported (no `register_tokens`), with blocks unchunked as released.

Weights (never downloaded here; pass the local file): https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/
dinov2_vitl14_pretrain.pth (likewise dinov2_vits14 / vitb14 / vitg14 for the other presets). A `.safetensors`
file with the same keys loads too.

Features (`dinov2_features`): uint8 images (N, 3, H, W) (grayscale repeated to three channels) are resized to
224x224 by Pillow's bicubic filter on the uint8 image, exactly the `Resize((224, 224), BICUBIC)` of a PIL image in
dgm-eval's pipeline (the FDD convention, `FDD_RESIZE`): Pillow resamples in fixed point, horizontally then vertically,
and rounds and clips to uint8 between the two passes. Then divided by 255 and normalised with the ImageNet mean and
std; the feature is the CLS token after the final norm, (N, D) (D = 1024 for ViT-L/14).

REPA's targets (`dinov2_patch_features`) are resized on the tensor's device instead (`tensor_preprocess`: bicubic with
antialiasing, rounded to integer pixel values), since they are made in bulk on the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import UserError
from .feature_io import GRAY, RGB, check_images, load_checked, read_state_dict

LN_EPS = 1e-6
PATCH = 14
PRETRAIN_GRID = 37  # pos_embed grid side: 518 / 14
POS_INTERPOLATE_OFFSET = 0.1  # DINOv2 adds this to the target grid side in the bicubic scale factor
MLP_RATIO = 4
SWIGLU_SHRINK = 2 / 3  # SwiGLU hidden width = 2/3 of the plain MLP's, rounded up to a multiple of 8
SWIGLU_ROUND = 8
INPUT_SIZE = 224  # (H, W) for FD_DINOv2
PIXEL_MAX = 255.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_BATCH = 100  # images per forward in `dinov2_features`
WEIGHTS_OPTION = "--dinov2-weights"
DEFAULT_PRESET = "ViT-L/14"
FDD_RESIZE = "pillow-bicubic-uint8"  # how `dinov2_features` resizes: dgm-eval's convention (the module docstring)


@dataclass(frozen=True)
class ViTConfig:
    dim: int  # D, token width
    depth: int  # number of blocks
    heads: int  # attention heads; D must divide evenly
    swiglu: bool = False  # SwiGLU MLP (ViT-g) instead of fc1-GELU-fc2
    patch: int = PATCH
    pretrain_grid: int = PRETRAIN_GRID
    checkpoint: str = "a DINOv2 checkpoint"  # the file users should fetch, for error messages


PRESETS: dict[str, ViTConfig] = {
    "ViT-S/14": ViTConfig(dim=384, depth=12, heads=6, checkpoint="dinov2_vits14_pretrain.pth"),
    "ViT-B/14": ViTConfig(dim=768, depth=12, heads=12, checkpoint="dinov2_vitb14_pretrain.pth"),
    "ViT-L/14": ViTConfig(dim=1024, depth=24, heads=16, checkpoint="dinov2_vitl14_pretrain.pth"),
    "ViT-g/14": ViTConfig(dim=1536, depth=40, heads=24, swiglu=True, checkpoint="dinov2_vitg14_pretrain.pth"),
}


def weights_hint(config: ViTConfig) -> str:
    return (
        f"get {config.checkpoint} from https://dl.fbaipublicfiles.com/dinov2/ and pass its path with {WEIGHTS_OPTION}"
    )


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UserError(f"ViT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q, k, v, each (B, heads, T, D / heads)."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)  # (B, T, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim), scale 1 / sqrt(head_dim)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2, hidden width MLP_RATIO * D."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden(dim: int) -> int:
    """SwiGLU hidden width for token width `dim`: 4096 for ViT-g's 1536."""
    return (int(MLP_RATIO * dim * SWIGLU_SHRINK) + SWIGLU_ROUND - 1) // SWIGLU_ROUND * SWIGLU_ROUND


class SwiGLU(nn.Module):
    """w12 (D -> 2H) split into gate and value, silu(gate) * value, w3 (H -> D)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (B, T, H)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.attn = Attention(config.dim, config.heads)
        self.ls1 = LayerScale(config.dim)
        self.norm2 = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.mlp = SwiGLU(config.dim) if config.swiglu else Mlp(config.dim)
        self.ls2 = LayerScale(config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(RGB, config.dim, config.patch, stride=config.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) -> (B, (H / p) * (W / p), D), row-major over the patch grid."""
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2ViT(nn.Module):
    """A DINOv2 ViT whose `forward` maps normalised images (B, 3, H, W), H and W multiples of the patch,
    to the final-norm CLS token (B, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, grid = config.dim, config.pretrain_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, D): the CLS position plus the patch positions resized to the input grid."""
        base = self.config.pretrain_grid
        if (grid_h, grid_w) == (base, base):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, base^2, D)
        patch_pos = patch_pos.float().reshape(1, base, base, -1).permute(0, 3, 1, 2)  # (1, D, base, base)
        scale = ((grid_h + POS_INTERPOLATE_OFFSET) / base, (grid_w + POS_INTERPOLATE_OFFSET) / base)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2).to(self.pos_embed.dtype)  # (1, gh * gw, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens (B, 1 + gh * gw, D): CLS first, then the patches row-major."""
        grid_h, grid_w = x.shape[2] // self.config.patch, x.shape[3] // self.config.patch
        tokens = self.patch_embed(x)  # (B, gh * gw, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding(grid_h, grid_w)  # (B, 1 + gh * gw, D)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]  # (B, D)


def resolve_preset(preset: str | ViTConfig) -> ViTConfig:
    if isinstance(preset, ViTConfig):
        return preset
    if preset not in PRESETS:
        raise UserError(f"unknown DINOv2 preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def load_dinov2(
    path: str | Path | None, preset: str | ViTConfig = DEFAULT_PRESET, device: torch.device | str = "cpu"
) -> DINOv2ViT:
    """The DINOv2 ViT of `preset` (a PRESETS name or a ViTConfig) with the weights at `path`, in eval mode."""
    config = resolve_preset(preset)
    hint = weights_hint(config)
    state = read_state_dict(path, hint)
    model = DINOv2ViT(config)
    load_checked(model, state, path, hint)
    return model.to(device).eval()


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 3 or 1, H, W) -> (N, 3, H, W), grayscale repeated to three channels."""
    return images.expand(-1, RGB, -1, -1) if images.shape[1] == GRAY else images


def normalise(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 255] -> x / 255, then ImageNet-normalised per channel."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, RGB, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, RGB, 1, 1)
    return (x / PIXEL_MAX - mean) / std


def pillow_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size) on the CPU, each image resized by Pillow's bicubic filter."""
    hwc = images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)) for image in hwc]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)  # (N, 3, size, size)


def fdd_preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 images (N, 3 or 1, H, W) -> float32 (N, 3, size, size) on the CPU, resized as FDD_RESIZE, normalised."""
    if images.dtype != torch.uint8:
        raise UserError(f"FDD features take uint8 images (its convention resizes them with Pillow), got {images.dtype}")
    x = to_rgb(images)
    if tuple(x.shape[2:]) != (size, size):
        x = pillow_resize(x, size)
    return normalise(x.cpu().float())


def tensor_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """images (N, 3 or 1, H, W), uint8 or float in [0, 255] -> float32 (N, 3, size, size), ImageNet-normalised,
    resized on their device: bicubic with antialiasing, rounded back to integer pixel values."""
    x = to_rgb(images.float())
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, PIXEL_MAX).round()
    return normalise(x)


@torch.no_grad()
def dinov2_features(model: DINOv2ViT, images: torch.Tensor, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """uint8 images (N, 3 or 1, H, W) -> final-norm CLS tokens (N, D), CPU float32, preprocessed as FDD's convention."""
    check_images(images, "the DINOv2 network")
    device = next(model.parameters()).device
    return torch.cat([model(fdd_preprocess(block).to(device)).float().cpu() for block in images.split(batch_size)])


@torch.no_grad()
def dinov2_patch_features(model: DINOv2ViT, images: torch.Tensor, grid: int) -> torch.Tensor:
    """images (N, 3, H, W) in [0, 255] -> final-norm patch tokens (N, grid * grid, D) on a grid x grid patch grid
    (the images resized to grid * patch pixels; 16 x 16 at 224 for ViT-*/14): REPA's alignment targets."""
    check_images(images, "the DINOv2 network")
    device = next(model.parameters()).device
    return model.tokens(tensor_preprocess(images.to(device), grid * model.config.patch))[:, 1:].float()
