"""Latte's text-to-video transformer in sprintdit's backbone: diffusers' `LatteTransformer3DModel` folders imported
exactly (and written back), on `model.video_layout: factorised` with PixArt's pieces (adaLN-single, T5 captions
cross-attended in the spatial blocks, sin-cos positions scaled to the base grid, learned sigma).

Layout (diffusers -> ours): spatial block `transformer_blocks.i` -> `blocks.2i`, temporal block
`temporal_transformer_blocks.i` -> `blocks.2i+1` (no cross-attention), each renamed as PixArt's blocks are
(sprintdit/pixart.py); the rest is PixArt's layout. The frames' sin-cos table (diffusers' temp_pos_embed, of
video_length rows, added before the first temporal block when a clip has more than one frame) is ours too (Block
time_pos); diffusers adds its whole table, so it only runs clips of video_length frames (or one), ours any length up
to input_size[0]. The caption: diffusers' Latte takes no mask in its pipeline (LattePipeline calls the transformer
without one, and the transformer's own mask argument is not repeated over the frames), so every caption row is a key,
padding included (model.text.mask_padding false); for one prompt the pipeline first cuts the rows to the prompt's
length, for several it zeroes the padding rows, which are then still attended (sprintdit does the latter always).
Its negative prompt is encoded unmasked: the unconditional caption keeps the encoder's output at the padding rows.
Refused in one line: activation functions other than gelu-approximate (the class's default is geglu; Latte-1's is
not), norm types other than ada_norm_single, attention without biases, any other transformer class.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .models import resolve_model_config
from .pixart import (
    DDPM_STEPS,
    PIXART_POS_GRID,
    BlockPlace,
    diffusers_to_ours,
    ours_to_diffusers,
)
from .sections import ModelConfig, SprintConfig, TextConfig

LATTE_CLASS = "LatteTransformer3DModel"
LATTE_DEFAULTS = {"activation_fn": "geglu", "norm_type": "layer_norm", "attention_bias": False, "video_length": 16}
T2V_KEY = "transformer_blocks.0.attn1.to_q.weight"  # marks Latte's own text-to-video checkpoint (diffusers' names)
T2V_INPUT_SIZE = [16, 64, 64]  # Latte-1: 16 frames of 512 px (64x64 SD-VAE latents); not stored in its .pt
T2V_HEAD_DIM = 72  # Latte-XL's head width (1152 = 16 x 72); the .pt does not store the head count
T2V_NORM_EPS = 1e-6  # Latte-1's transformer config
MLP_RATIO = 4
BLOCK_LISTS = ("transformer_blocks.", "temporal_transformer_blocks.")


def latte_model_config(config: dict, input_size: list[int] | None, caption_tokens: int) -> ModelConfig:
    """Our ModelConfig of a diffusers LatteTransformer3DModel config (input_size None: video_length frames of its
    sample_size, square)."""
    get = {**LATTE_DEFAULTS, **config}.get
    wrong = {
        "activation_fn": (get("activation_fn"), "gelu-approximate"),
        "norm_type": (get("norm_type"), "ada_norm_single"),
        "attention_bias": (get("attention_bias"), True),
    }
    bad = [f"{k} {have!r} (needs {want!r})" for k, (have, want) in wrong.items() if have != want]
    if bad:
        raise UserError(f"{LATTE_CLASS} with {'; '.join(bad)} does not convert")
    side, patch, heads = config.get("sample_size", 64), config["patch_size"], config["num_attention_heads"]
    hidden, channels = heads * config["attention_head_dim"], config["in_channels"]
    out_channels = config.get("out_channels") or channels
    if out_channels not in (channels, 2 * channels) or config.get("cross_attention_dim", hidden) != hidden:
        raise UserError(
            f"{LATTE_CLASS} with {out_channels} output channels for {channels} inputs or cross_attention_dim "
            f"{config.get('cross_attention_dim')} for width {hidden} does not convert"
        )
    cfg = ModelConfig(
        condition="text", input_size=list(input_size or [get("video_length"), side, side]), in_channels=channels,
        patch_size=patch, video_layout="factorised", hidden_size=hidden, depth=2 * config["num_layers"],
        num_heads=heads, pos_embed="sincos", qk_norm=False, learn_sigma=out_channels == 2 * channels,
        norm_eps=float(config.get("norm_eps", 1e-5)), adaln="single", time_scale=float(DDPM_STEPS),
        pos_base=side // patch, pos_interpolation=float(max(side // PIXART_POS_GRID, 1)),
        text=TextConfig(encoder="t5", dim=config["caption_channels"], max_tokens=caption_tokens, mask_padding=False),
        sprint=SprintConfig(encoder_depth=0, decoder_depth=0, fusion="none", path_drop_prob=0.0),
    )  # fmt: skip
    return resolve_model_config(cfg)


def t2v_checkpoint_config(state: dict[str, torch.Tensor], input_size: list[int] | None, heads: int | None) -> dict:
    """The diffusers config of Vchitect/Latte's own text-to-video checkpoint (models/latte_t2v.py: diffusers' key
    names, so a LatteTransformer3DModel state dict), read off its tensors. Not stored: the clip length and latent side
    (`input_size` F,H,W; default Latte-1's 16 frames of 64x64 latents, 512 px) and the head count (default width / 72,
    Latte-XL's 16 x 72)."""
    frames, side, width = input_size if input_size is not None else T2V_INPUT_SIZE
    if side != width:
        raise UserError(f"--input-size {frames},{side},{width}: Latte's frames are square")
    hidden, channels, patch, _ = state["pos_embed.proj.weight"].shape  # (D, C, p, p)
    layers, temporal = (len({k.split(".")[1] for k in state if k.startswith(p)}) for p in BLOCK_LISTS)
    if temporal != layers:
        raise UserError(f"{layers} spatial but {temporal} temporal blocks: not a Latte text-to-video checkpoint")
    mlp = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]  # 4 D (gelu), 8 D (geglu: value and gate)
    heads = heads or hidden // T2V_HEAD_DIM
    if heads < 1 or hidden % heads:
        raise UserError(f"width {hidden} does not split into {heads} attention heads: give --num-heads")
    return {
        "_class_name": LATTE_CLASS, "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": channels,
        "out_channels": state["proj_out.weight"].shape[0] // patch**2, "num_layers": layers, "sample_size": side,
        "patch_size": patch, "cross_attention_dim": hidden,
        "caption_channels": state["caption_projection.linear_1.weight"].shape[1], "video_length": frames,
        "activation_fn": "gelu-approximate" if mlp == MLP_RATIO * hidden else "geglu",
        "norm_type": "ada_norm_single" if "adaln_single.linear.weight" in state else "layer_norm",
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in state, "norm_elementwise_affine": False,
        "norm_eps": T2V_NORM_EPS,
    }  # fmt: skip


def latte_blocks(cfg: ModelConfig) -> list[BlockPlace]:
    """Spatial block i is our block 2i (it cross-attends to the caption), temporal block i our block 2i + 1."""
    pairs = range(cfg.depth // 2)
    return [
        place
        for i in pairs
        for place in (
            (2 * i, f"transformer_blocks.{i}.", True),
            (2 * i + 1, f"temporal_transformer_blocks.{i}.", False),
        )
    ]


def latte_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    return diffusers_to_ours(state, cfg, latte_blocks(cfg), source, LATTE_CLASS)


def ours_to_latte(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return ours_to_diffusers(state, cfg, latte_blocks(cfg))


def latte_diffusers_config(cfg: ModelConfig) -> dict:
    """The LatteTransformer3DModel config.json of our Latte-layout network."""
    side = cfg.input_size[1]
    if cfg.video_layout != "factorised" or cfg.adaln != "single" or cfg.condition != "text" or cfg.pos_base is None:
        raise UserError("only a Latte-layout model (factorised video, adaln single, t5 captions) exports as Latte")
    if (
        cfg.input_size[1] != cfg.input_size[2]
        or cfg.pos_base * cfg.patch_size != side
        or cfg.pos_interpolation != max(side // PIXART_POS_GRID, 1)
    ):
        raise UserError(f"{LATTE_CLASS} computes its positions from a square sample_size: this model's differ")
    return {
        "_class_name": LATTE_CLASS, "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth // 2, "cross_attention_dim": cfg.hidden_size,
        "attention_bias": True, "sample_size": side, "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps,
        "caption_channels": cfg.text.dim, "video_length": cfg.input_size[0],
    }  # fmt: skip
