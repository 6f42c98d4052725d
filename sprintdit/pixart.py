"""PixArt-alpha's transformer in sprintdit's backbone: diffusers' `PixArtTransformer2DModel` folders and the original
release's checkpoints imported exactly (and written back to diffusers), on the switches of `ModelConfig` that PixArt
needs: condition text on T5 embeddings (`CaptionProjection`: Linear, GELU-tanh, Linear), cross-attention to the
caption with its padding masked, adaLN-single (`model.adaln: single`), no q/k norm, sin-cos positions scaled to the
base grid (`model.pos_base`, `model.pos_interpolation`), learned sigma, DiT's integer timesteps (`model.time_scale:
1000`).

Layout (diffusers name -> ours): pos_embed.proj -> x_embedder.proj (Conv2d flattened to a Linear);
adaln_single.emb.timestep_embedder.linear_1/2 -> t_embedder.mlp.0/2; adaln_single.linear -> t_block.1;
caption_projection.linear_1/2 -> y_embedder.fc1/fc2; transformer_blocks.i: scale_shift_table, attn1.to_q/k/v ->
attn.qkv (stacked), attn1.to_out.0 -> attn.proj, attn2.to_q -> cross_attn.q, attn2.to_k/v -> cross_attn.kv,
attn2.to_out.0 -> cross_attn.proj, ff.net.0.proj / ff.net.2 -> mlp.fc1 / fc2; scale_shift_table ->
final_layer.scale_shift_table; proj_out -> final_layer.linear (rows reordered from (p, q, c) to (c, p, q)).

The original release's checkpoints (`convert --from pixart`: PixArt-XL-2-{256,512}x*.pth, the PixArtMS 1024 model,
PixArt-Sigma's 256/512/1024 models) hold the same tensors under other names (ORIGINAL_RENAMES; qkv and the
cross-attention's kv_linear already stacked as ours are), plus the fixed sin-cos `pos_embed` of the training grid,
from which the base grid and `lewei_scale` (our pos_interpolation) are read and checked, and `y_embedder.y_embedding`,
the learned unconditional caption. The head count is not stored (default: width / 72, PixArt-XL's).

Conventions where the two sources differ, each followed for the checkpoints that came from it:
- the unconditional caption: diffusers' pipeline encodes the empty negative prompt with T5 (a diffusers folder carries
  no embedding of it: `--text-encoder-path` at convert or sample time fills it, and guidance refuses to run while
  it is unset); the original release uses y_embedding, masked to the length of the prompt it stands in for (its
  forward repeats the prompt's mask over the CFG batch, in training and sampling): model.text.null_caption learned.
- padded caption tokens: diffusers passes a mask beside the T5 output, the original drops the padded tokens
  (xformers' block-diagonal mask); sprintdit stores padding as zero rows and masks them. All three are the same
  attention.
- the final layer: both modulate it with the timestep embedding (plus the micro-conditions), not the 6D adaLN output.
- sampling: the original samples with DPM-Solver's own continuous-time multistep (time_uniform steps); diffusers'
  DPMSolverMultistepScheduler on discrete training steps, which sprintdit follows (dpm-solver++).
- sinusoids: diffusers makes timestep and position tables in float32, the original its positions in float64 numpy
  (stored as float32); ours are float64, cast to float32.
- diffusers' conversion script (scripts/convert_pixart_alpha_to_diffusers.py) fills the 1024 model's aspect-ratio
  embedder from csize_embedder's weights, not ar_embedder's: a folder it made differs from the .pth there (we have
  not checked the Hub's PixArt-XL-2-1024-MS); `--from pixart` takes ar_embedder as the release trained it.
The 1024 models' resolution and aspect-ratio micro-conditions (use_additional_conditions) are `model.micro_conditions`:
the image size the network is told is its latent size x `model.micro_scale` (8), as the pipeline tells it the size it
makes. Refused in one line: other norm types, PixArt-Sigma's KV-compressed attention, any other transformer class.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .checkpoint import check_state
from .errors import UserError
from .models import SiT, resolve_model_config
from .models.sit import axis_channels, dit_final_rows, ours_to_dit_rows, sincos_at, sincos_positions
from .sections import ModelConfig, SprintConfig, TextConfig

PIXART_CLASS = "PixArtTransformer2DModel"
PIXART_CAPTION_TOKENS = 120  # PixArt-alpha's T5 caption length (Sigma: 300); not stored in the weights
PIXART_MICRO_SIZE = 128  # the latent size of the 1024 px models, which take micro-conditions by default
PIXART_POS_GRID = 64  # diffusers' default interpolation_scale is sample_size // 64 (at least 1)
DDPM_STEPS = 1000  # PixArt's training steps: the network sees the integer step
PIXART_SAMPLING_STEPS = 20  # PixArt-alpha's DPM-Solver++ steps
PIXART_GUIDANCE_SCALE = 4.5  # PixArt-alpha's classifier-free guidance scale
PIXART_HEAD_DIM = 72  # PixArt-XL/2's attention head width (1152 / 16 heads): the original weights do not store it
ORIGINAL_ENTRIES = ("state_dict", "state_dict_ema")  # the original release's training dict (weights, EMA)
ORIGINAL_RENAMES = (  # original key part -> ours; every other original key is ours already
    ("y_embedder.y_proj.", "y_embedder."),
    ("y_embedder.y_embedding", "y_embedder.empty"),
    ("csize_embedder.", "size_embedder."),
    ("ar_embedder.", "aspect_embedder."),
    (".cross_attn.q_linear.", ".cross_attn.q."),
    (".cross_attn.kv_linear.", ".cross_attn.kv."),
)
POS_TABLE_ATOL = 1e-5  # a stored table is a float32 copy of a float64 computation
KV_COMPRESSION = (".attn.sr.", ".attn.norm.")  # PixArt-Sigma's KV-token compression (its 2K / 4K models)


def pixart_model_config(config: dict, input_size: list[int] | None, caption_tokens: int) -> ModelConfig:
    """Our ModelConfig of a diffusers PixArtTransformer2DModel config (input_size None: its sample_size, square)."""
    if config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise UserError(f"{PIXART_CLASS} with norm_type {config.get('norm_type')!r}: only ada_norm_single converts")
    side = config.get("sample_size", 128)
    micro = config.get("use_additional_conditions")
    micro = side == PIXART_MICRO_SIZE if micro is None else bool(micro)  # diffusers' default: on for sample_size 128
    if config.get("attention_type", "default") != "default" or config.get("activation_fn", "gelu-approximate") != (
        "gelu-approximate"
    ):
        raise UserError(f"{PIXART_CLASS} with attention_type / activation_fn other than default / gelu-approximate")
    patch, heads = config.get("patch_size", 2), config["num_attention_heads"]
    hidden, channels = heads * config["attention_head_dim"], config.get("in_channels", 4)
    out_channels = config.get("out_channels") or channels
    if out_channels not in (channels, 2 * channels):
        raise UserError(f"{PIXART_CLASS} with {out_channels} output channels for {channels} input ones")
    if config.get("cross_attention_dim", hidden) != hidden:
        raise UserError(
            f"{PIXART_CLASS}: cross_attention_dim {config['cross_attention_dim']} is not the width {hidden}"
        )
    interpolation = config.get("interpolation_scale") or max(side // PIXART_POS_GRID, 1)
    cfg = ModelConfig(
        condition="text", input_size=list(input_size or [side, side]), in_channels=channels, patch_size=patch,
        hidden_size=hidden, depth=config["num_layers"], num_heads=heads, pos_embed="sincos", qk_norm=False,
        learn_sigma=out_channels == 2 * channels, norm_eps=float(config.get("norm_eps", 1e-6)), adaln="single",
        time_scale=float(DDPM_STEPS), pos_base=side // patch, pos_interpolation=float(interpolation),
        micro_conditions=micro,
        text=TextConfig(encoder="t5", dim=config["caption_channels"], max_tokens=caption_tokens),
        sprint=SprintConfig(encoder_depth=0, decoder_depth=0, fusion="none", path_drop_prob=0.0),
    )  # fmt: skip
    return resolve_model_config(cfg)


# A block's place in each layout: (our index, diffusers' key prefix, whether it cross-attends to the caption).
BlockPlace = tuple[int, str, bool]


def pixart_blocks(cfg: ModelConfig) -> list[BlockPlace]:
    return [(i, f"transformer_blocks.{i}.", True) for i in range(cfg.depth)]


def block_keys(place: BlockPlace) -> dict[str, str]:
    """Our key -> diffusers' key within one block, for the tensors that map one to one."""
    i, theirs, cross = place
    pairs = {"scale_shift_table": "scale_shift_table"}
    for w in ("weight", "bias"):
        pairs |= {f"attn.proj.{w}": f"attn1.to_out.0.{w}", f"mlp.fc1.{w}": f"ff.net.0.proj.{w}"}
        pairs[f"mlp.fc2.{w}"] = f"ff.net.2.{w}"
        if cross:
            pairs |= {f"cross_attn.q.{w}": f"attn2.to_q.{w}", f"cross_attn.proj.{w}": f"attn2.to_out.0.{w}"}
    return {f"blocks.{i}.{k}": theirs + v for k, v in pairs.items()}


MICRO_KEYS = {  # our key -> diffusers' key: the 1024 models' micro-conditions
    f"{ours}.mlp.{j}.{w}": f"adaln_single.emb.{theirs}.linear_{n}.{w}"
    for ours, theirs in (("size_embedder", "resolution_embedder"), ("aspect_embedder", "aspect_ratio_embedder"))
    for j, n in ((0, 1), (2, 2))
    for w in ("weight", "bias")
}
SHARED_KEYS = {  # our key -> diffusers' key, outside the blocks
    **{f"t_embedder.mlp.{j}.{w}": f"adaln_single.emb.timestep_embedder.linear_{n}.{w}" for j, n in ((0, 1), (2, 2))
       for w in ("weight", "bias")},
    **{f"t_block.1.{w}": f"adaln_single.linear.{w}" for w in ("weight", "bias")},
    **{f"y_embedder.fc{n}.{w}": f"caption_projection.linear_{n}.{w}" for n in (1, 2) for w in ("weight", "bias")},
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.scale_shift_table": "scale_shift_table",
    "final_layer.linear.bias": "proj_out.bias",
}  # fmt: skip
STACKED = {"attn.qkv": ("attn1", "qkv"), "cross_attn.kv": ("attn2", "kv")}  # ours -> (diffusers module, parts)


def key_mapping(cfg: ModelConfig, blocks: list[BlockPlace]) -> dict[str, str]:
    """Our key -> diffusers' key for every tensor that maps one to one."""
    in_blocks = {k: v for place in blocks for k, v in block_keys(place).items()}
    return SHARED_KEYS | in_blocks | (MICRO_KEYS if cfg.micro_conditions else {})


def stacked_keys(blocks: list[BlockPlace]) -> dict[str, tuple[str, str, str]]:
    """Our stacked projection key -> (diffusers' module prefix, its parts, weight or bias)."""
    return {
        f"blocks.{i}.{ours}.{w}": (f"{theirs}{module}.", parts, w)
        for i, theirs, cross in blocks
        for ours, (module, parts) in STACKED.items()
        if cross or module == "attn1"
        for w in ("weight", "bias")
    }


def diffusers_to_ours(
    state: dict[str, torch.Tensor], cfg: ModelConfig, blocks: list[BlockPlace], source: str, class_name: str
) -> dict[str, torch.Tensor]:
    """diffusers' adaLN-single transformer tensors (PixArt, Latte) as our state dict (float32), every key and shape
    checked against our network."""
    mapping, stacked = key_mapping(cfg, blocks), stacked_keys(blocks)
    needed = [*mapping.values(), "pos_embed.proj.weight", "proj_out.weight"]
    needed += [f"{prefix}to_{p}.{w}" for prefix, parts, w in stacked.values() for p in parts]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{source} is not a {class_name} of this config: it lacks {missing[:3]}")
    extra = sorted(set(state) - set(needed))
    if extra:
        raise UserError(f"{source} has tensors this {class_name} config does not explain: {extra[:3]}")
    out = {ours: state[theirs].float() for ours, theirs in mapping.items()}
    for ours, (prefix, parts, w) in stacked.items():
        out[ours] = torch.cat([state[f"{prefix}to_{p}.{w}"].float() for p in parts])
    out["x_embedder.proj.weight"] = state["pos_embed.proj.weight"].float().flatten(1)  # (D, C, p, p) -> (D, C p p)
    out["final_layer.linear.weight"] = dit_final_rows(state["proj_out.weight"].float(), cfg.patch_size)
    out["final_layer.linear.bias"] = dit_final_rows(out["final_layer.linear.bias"], cfg.patch_size)
    out["y_embedder.empty"] = torch.zeros(cfg.text.max_tokens, cfg.text.dim)  # see the module docstring
    out["mask_token"] = torch.zeros(1, 1, cfg.hidden_size)  # unused: a dense model (fusion none) drops no token
    with torch.device("meta"):
        check_state(SiT(cfg), out, source)
    return out


def ours_to_diffusers(
    state: dict[str, torch.Tensor], cfg: ModelConfig, blocks: list[BlockPlace]
) -> dict[str, torch.Tensor]:
    """The inverse of diffusers_to_ours (the empty caption and the MASK token dropped: diffusers has neither)."""
    out = {theirs: state[ours] for ours, theirs in key_mapping(cfg, blocks).items()}
    for ours, (prefix, parts, w) in stacked_keys(blocks).items():
        out |= {f"{prefix}to_{p}.{w}": c for p, c in zip(parts, state[ours].chunk(len(parts)))}
    p, d = cfg.patch_size, cfg.hidden_size
    out["pos_embed.proj.weight"] = state["x_embedder.proj.weight"].reshape(d, cfg.in_channels, p, p)
    for name, ours in (("proj_out.weight", "final_layer.linear.weight"), ("proj_out.bias", "final_layer.linear.bias")):
        out[name] = ours_to_dit_rows(state[ours], p)
    return {k: v.contiguous() for k, v in out.items()}


def pixart_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    return diffusers_to_ours(state, cfg, pixart_blocks(cfg), source, PIXART_CLASS)


def ours_to_pixart(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return ours_to_diffusers(state, cfg, pixart_blocks(cfg))


def pixart_diffusers_config(cfg: ModelConfig) -> dict:
    """The PixArtTransformer2DModel config.json of our PixArt-layout network."""
    if cfg.adaln != "single" or cfg.condition != "text" or cfg.text.encoder == "learned" or cfg.pos_base is None:
        raise UserError("only a PixArt-layout model (adaln single, t5/clip captions, pos_base) exports as PixArt")
    side = cfg.pos_base * cfg.patch_size
    return {
        "_class_name": PIXART_CLASS, "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth, "cross_attention_dim": cfg.hidden_size,
        "caption_channels": cfg.text.dim, "sample_size": side, "patch_size": cfg.patch_size,
        "norm_type": "ada_norm_single", "norm_eps": cfg.norm_eps, "interpolation_scale": cfg.pos_interpolation,
        "use_additional_conditions": cfg.micro_conditions,
    }  # fmt: skip


# ----------------------------------------------------------------------------------- the original release's layout


def original_model_config(state: dict[str, torch.Tensor], input_size: list[int] | None, heads: int | None, source: str):
    """Our ModelConfig of an original PixArt-alpha / PixArt-Sigma state dict (PixArt, PixArtMS classes). The base
    grid and `lewei_scale` (our pos_interpolation) are read off the stored pos_embed table; the head count is not
    stored (default: width / 72, PixArt-XL's)."""
    for need in ("x_embedder.proj.weight", "y_embedder.y_embedding", "y_embedder.y_proj.fc1.weight"):
        if need not in state:
            raise UserError(f"{source} is not an original PixArt checkpoint: it lacks {need}")
    compressed = sorted({k.split(".attn.")[0] for k in state if any(part in k for part in KV_COMPRESSION)})
    if compressed:
        raise UserError(
            f"{source} uses PixArt-Sigma's KV-compressed attention ({compressed[0]}.attn.sr): not supported; its "
            "256/512/1024 models without compression are"
        )
    hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    tokens, caption_dim = state["y_embedder.y_embedding"].shape  # (L, E)
    out_channels = (
        state["final_layer.linear.weight"].shape[0] // patch**2 if "final_layer.linear.weight" in state else 0
    )
    if out_channels not in (channels, 2 * channels):
        raise UserError(f"{source}: final_layer.linear gives {out_channels} channels for {channels} input ones")
    pos = state.get("pos_embed")  # (1, N, D): the training resolution's table
    if pos is None and input_size is None:
        raise UserError(f"{source} has no pos_embed: give --input-size (latent side, image side / 8)")
    base = math.isqrt(pos.shape[1]) if pos is not None else input_size[0] // patch
    cfg = ModelConfig(
        condition="text", input_size=list(input_size or [base * patch] * 2), in_channels=channels, patch_size=patch,
        hidden_size=hidden, depth=block_count(state), num_heads=heads or hidden // PIXART_HEAD_DIM,
        pos_embed="sincos", qk_norm=False, learn_sigma=out_channels == 2 * channels, adaln="single",
        time_scale=float(DDPM_STEPS), pos_base=base, pos_interpolation=interpolation_of(pos, base * patch, hidden),
        micro_conditions="csize_embedder.mlp.0.weight" in state,
        text=TextConfig(encoder="t5", dim=caption_dim, max_tokens=tokens, null_caption="learned"),
        sprint=SprintConfig(encoder_depth=0, decoder_depth=0, fusion="none", path_drop_prob=0.0),
    )  # fmt: skip
    return resolve_model_config(cfg)


def block_count(state: dict[str, torch.Tensor]) -> int:
    found = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if found != set(range(len(found))) or not found:
        raise UserError(f"the checkpoint's blocks.i indices are not 0..n-1: {sorted(found)[:8]}")
    return len(found)


def interpolation_of(pos: torch.Tensor | None, sample_size: int, hidden: int) -> float:
    """PixArt's lewei_scale from its stored table (1, N, D): token 1 sits at column 1 / scale, and the table's first
    channel pair is (sin, cos) of the column (frequency 1). No table: diffusers' default for that latent side."""
    if pos is None:
        return float(max(sample_size // PIXART_POS_GRID, 1))
    angle = math.atan2(pos[0, 1, 0].item(), pos[0, 1, hidden // 4].item())
    return round(1.0 / angle, 6)


def original_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """An original PixArt state dict as ours (float32): keys renamed (ORIGINAL_RENAMES), the patch Conv2d flattened,
    the final rows reordered, y_embedding kept as the unconditional table; pos_embed checked, then dropped."""
    out = {}
    for key, value in state.items():
        for theirs, ours in ORIGINAL_RENAMES:
            key = key.replace(theirs, ours)
        out[key] = value.float()
    pos = out.pop("pos_embed", None)
    if pos is not None:
        native = replace(cfg, input_size=[cfg.pos_base * cfg.patch_size] * 2)  # the table's own grid
        table = sincos_at(sincos_positions(native), axis_channels(cfg.hidden_size, native.grid))  # (N, D)
        diff = (pos[0].double() - table.double()).abs().max().item() if pos.shape[1:] == table.shape else math.inf
        if diff > POS_TABLE_ATOL:
            raise UserError(
                f"{source}: pos_embed is not PixArt's sin-cos table of a {cfg.pos_base}x{cfg.pos_base} grid at "
                f"lewei_scale {cfg.pos_interpolation:g} (max difference {diff:.3g})"
            )
    out["x_embedder.proj.weight"] = out["x_embedder.proj.weight"].flatten(1)  # (D, C, p, p) -> (D, C p p)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        out[name] = dit_final_rows(out[name], cfg.patch_size)
    out["mask_token"] = torch.zeros(1, 1, cfg.hidden_size)  # unused: a dense model (fusion none) drops no token
    with torch.device("meta"):
        check_state(SiT(cfg), out, source)
    return out
