"""Import released checkpoints as sprintdit run folders: the SPRINT release, willisma/SiT, facebookresearch/DiT,
PixArt-alpha / Sigma's original .pth (sprintdit/pixart.py), Latte's original class-conditional and unconditional
checkpoints, and diffusers' DiTTransformer2DModel, PixArtTransformer2DModel and LatteTransformer3DModel folders (e.g.
facebook/DiT-XL-2-256's transformer/, sprintdit/latte.py); export to the latter three. Runs of the
releases' 4-channel SD-VAE latents sample with `--vae` (the weights name no VAE).

    sprintdit convert --from dit --checkpoint DiT-XL-2-256x256.pt --out runs/dit-xl-2
    -> OUT/config.yaml, OUT/model.safetensors, OUT/ema.safetensors (a checkpoint folder, no training state)

Reading never unpickles arbitrary objects: safetensors, or torch.load(weights_only=True) with one extra
allowed type, argparse.Namespace (the DiT / SiT / SPRINT training scripts save their `args` as one).
The architecture is inferred from the tensors; every source key is either mapped or dropped by name
(DiT/SiT `pos_embed`, SPRINT `projectors.*`), and the result must match our network key by key and shape.

Weight changes per source (the converted model computes what the released network computes):
  dit     Conv2d patch weight (D, C, p, p) -> Linear (D, C*p*p), the same numbers; pos_embed checked against
          our sin-cos table and dropped; final linear rows reordered from DiT's un-patchify order
          (p_row, p_col, c) to ours (c, p_row, p_col). Dense model, DDPM objective; DiT embeds the integer
          step k, ours t = k / T times model.time_scale = T.
  sit     as dit, then SiT's time direction folded into the weights. SiT: x_s = s x0 + (1-s) eps (s = 1 is
          data), prediction u = x0 - eps; ours: x_t = (1-t) x0 + t eps, v = eps - x0, so v(x, t) = -u(x, 1-t):
          the velocity rows of the final linear are negated, and the timestep MLP's first layer absorbs the
          fixed map [cos(t w), sin(t w)] -> [cos((1-t) w), sin((1-t) w)] (per frequency w). Flow objective.
  sprint  {encoder,middle,decoder}_blocks.i -> blocks.j in that order, renoise_linear -> fusion; all other
          tensors as they are (same patch order, RoPE, t = 1 is noise). projectors.* (REPA head) dropped.
  latte   as dit on model.video_layout factorised (blocks alternate space and time, as models/latte.py's): pos_embed
          is one frame's table, temp_embed (1, F, D) the frames' 1D table (both checked, then dropped); an
          unconditional checkpoint becomes one class with a zero embedding. Its text-to-video .pt (latte_t2v.py)
          carries diffusers' names: read as a LatteTransformer3DModel (frames, latent side and heads from
          --input-size F,H,W and --num-heads; default Latte-1's 16,64,64 and width / 72).
  diffusers  renamed to DiT's layout (to_q/to_k/to_v -> qkv, ff.net -> mlp, norm1.linear -> adaLN_modulation,
          proj_out_1/2 -> final_layer), then as dit. Its blocks each carry a copy of the timestep and class
          embedders (they must agree: ours has one); its timestep frequencies are exp(-ln(10000) i / (half - 1))
          (model.time_freq_shift 1) and its block LayerNorms use config.json's norm_eps (the final one 1e-6).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import save_weights_folder
from .config import DataConfig, RunConfig, to_yaml
from .errors import UserError
from .latte import (
    LATTE_CLASS,
    T2V_KEY,
    latte_diffusers_config,
    latte_model_config,
    latte_to_ours,
    ours_to_latte,
    t2v_checkpoint_config,
)
from .models.sit import (
    PRESETS,
    SIZES,
    TIMESTEP_FREQ_DIM,
    ModelConfig,
    SiT,
    SprintConfig,
    dit_final_rows,
    ours_to_dit_rows,
    position_grid,
    resolve_model_config,
    sincos_table,
    time_table,
    timestep_frequencies,
)
from .objective import ObjectiveConfig
from .pixart import (
    ORIGINAL_ENTRIES,
    PIXART_CAPTION_TOKENS,
    PIXART_CLASS,
    PIXART_GUIDANCE_SCALE,
    PIXART_HEAD_DIM,
    PIXART_SAMPLING_STEPS,
    original_model_config,
    original_to_ours,
    ours_to_pixart,
    pixart_diffusers_config,
    pixart_model_config,
    pixart_to_ours,
)
from .sampling import SampleConfig
from .text_encoders import empty_caption

SOURCES = ("sprint", "sit", "dit", "diffusers", "pixart", "latte")
DIFFUSERS_CLASS = "DiTTransformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_NORM_EPS = 1e-5  # DiTTransformer2DModel's default norm_eps (its blocks' LayerNorms)
DIFFUSERS_FINAL_NORM_EPS = 1e-6  # its final LayerNorm, fixed
LABELS = "y_embedder.embedding_table.weight"  # DiT-layout class table (num_classes + 1 null row, D)
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
TRAINING_ENTRIES = ("model", "ema")  # a training checkpoint's weights; "opt", "args", "steps" are ignored
SAFE_PICKLE_TYPES = [argparse.Namespace]
SPRINT_STAGES = ("encoder_blocks", "middle_blocks", "decoder_blocks")
SPRINT_PATCH_SIZE = 2  # the release hard-codes patch size 2
SPRINT_PATH_DROP = 0.1  # the release's path-drop probability (a training setting, not in the weights)
DROPPED = {
    "dit": (),
    "latte": (),
    "sit": (),
    "sprint": ("projectors.",),
}  # key prefixes with no counterpart (pos_embed: checked, then dropped)
POS_EMBED_ATOL = 1e-5  # released tables are float32 copies of a float64 computation
MASK_TOKEN_SEED = 0  # dense sources have no MASK token: ours is drawn as in training, reproducibly
DENSE_GUIDANCE_SCALE = 1.5  # DiT's and SiT's FID setting (classifier-free guidance)
SD_LATENT_CHANNELS = 4  # the SD VAE's latent channels, which every supported release models
DDPM_SOURCES = ("dit", "latte")  # the DiT-layout releases trained with DDPM (integer steps, learned sigma)
DDPM_STEPS = 1000  # DiT's training steps T (objective.num_timesteps)
DIT_SAMPLING_STEPS = 250  # DiT's respaced DDPM sampling


@dataclass
class ConvertOptions:
    source: str  # sprint | sit | dit
    input_size: Optional[list[int]] = None  # [H, W] of the model input; DiT/SiT: default from pos_embed
    patch_size: Optional[int] = None  # SPRINT stores a Linear patch embedding: default SPRINT_PATCH_SIZE
    num_heads: Optional[int] = None  # default: from q_norm (SPRINT), the preset, or the preset size of that width
    preset: Optional[str] = None  # e.g. DiT-XL/2 or SiT-XL/2: sizes checked against the tensors
    caption_tokens: Optional[int] = None  # diffusers' PixArt: T5 tokens (default 120, alpha's; Sigma: 300)
    text_encoder_path: Optional[str] = None  # diffusers' PixArt: T5 folder that encodes the empty caption


@dataclass
class Converted:
    model: ModelConfig
    weights: dict[str, torch.Tensor]  # "model" entry (or the plain state dict)
    ema: dict[str, torch.Tensor]  # "ema" entry (or the plain state dict)
    notes: list[str]


# ----------------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> object:
    """The file's top-level object, read without unpickling anything but tensors, containers and Namespaces."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        what = found.group(1) if found else "objects other than tensors"
        raise UserError(
            f"refusing to unpickle {path}: it holds {what}; where you trust the file, re-save its weights alone "
            "(torch.save(ckpt['ema'], 'ema.pt'), or safetensors) and convert that"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0]})") from None


def strip_wrappers(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """Keys without `_orig_mod.` / `module.` prefixes; every value must be a tensor."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor (expected a state dict)")
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise UserError(f"{path}: '{key}' and another key both name '{name}' once wrapper prefixes are removed")
        out[name] = value
    return out


def state_dicts(obj: object, path: Path, names: tuple[str, str] = TRAINING_ENTRIES) -> tuple[dict, dict]:
    """(model, EMA) state dicts: a training checkpoint's entries `names` (model, EMA; either one standing in for a
    missing other), or a plain state dict twice."""
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    entries = {k: obj[k] for k in names if isinstance(obj.get(k), dict)}
    if not entries:
        state = strip_wrappers(obj, path)
        return state, state
    model_name, ema_name = names
    model_raw = entries.get(model_name, entries.get(ema_name))
    ema_raw = entries.get(ema_name, model_raw)
    model = strip_wrappers(model_raw, path)
    return model, model if ema_raw is model_raw else strip_wrappers(ema_raw, path)


# ----------------------------------------------------------------------------------- diffusers' DiT layout


def read_diffusers(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json) of a DiTTransformer2DModel folder (or a pipeline folder holding transformer/)."""
    folder = path if path.is_dir() else path.parent
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} has no config.json: give a diffusers DiTTransformer2DModel folder (e.g. "
            f"DiT-XL-2-256/transformer)"
        )
    config = json.loads((folder / "config.json").read_text())
    dit = config.get("_class_name", DIFFUSERS_CLASS) == DIFFUSERS_CLASS
    if not (
        dit
        and config.get("norm_type", "ada_norm_zero") == "ada_norm_zero"
        or config["_class_name"] in (PIXART_CLASS, LATTE_CLASS)
    ):
        raise UserError(
            f"{folder / 'config.json'} describes a {config.get('_class_name')} ({config.get('norm_type')}); "
            f"{DIFFUSERS_CLASS} with ada_norm_zero, {PIXART_CLASS} and {LATTE_CLASS} convert"
        )
    weights = path if path.is_file() else folder / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} is missing (diffusers stores the weights as {DIFFUSERS_WEIGHTS})")
    return state_dicts(read_checkpoint(weights), weights)[0], config


def diffusers_block_map(i: int) -> dict[str, str]:
    """DiT key -> diffusers key within block i (the attention projections are handled apart: three into qkv)."""
    b = f"transformer_blocks.{i}."
    return (
        {f"blocks.{i}.adaLN_modulation.1.{w}": f"{b}norm1.linear.{w}" for w in ("weight", "bias")}
        | {f"blocks.{i}.attn.proj.{w}": f"{b}attn1.to_out.0.{w}" for w in ("weight", "bias")}
        | {f"blocks.{i}.mlp.fc1.{w}": f"{b}ff.net.0.proj.{w}" for w in ("weight", "bias")}
        | {f"blocks.{i}.mlp.fc2.{w}": f"{b}ff.net.2.{w}" for w in ("weight", "bias")}
    )


DIFFUSERS_SHARED = {  # DiT key -> diffusers key (block 0's copy of the embedders)
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0.weight": "norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "norm1.emb.class_embedder.embedding_table.weight",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
EMBEDDERS = ("t_embedder.", "y_embedder.")  # stored once per block by diffusers


def diffusers_key(dit_key: str, block: int = 0) -> str:
    """Where a shared DiT tensor lives in diffusers (embedders: in block `block`'s norm1)."""
    key = DIFFUSERS_SHARED[dit_key]
    return f"transformer_blocks.{block}.{key}" if dit_key.startswith(EMBEDDERS) else key


def diffusers_to_dit(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' DiTTransformer2DModel tensors in facebookresearch/DiT's layout (pos_embed: the sin-cos table)."""
    depth = block_count(state, "transformer_blocks")
    out = {}
    for dit_key in DIFFUSERS_SHARED:
        key = diffusers_key(dit_key)
        if key not in state:
            raise UserError(f"not a {DIFFUSERS_CLASS} state dict: it has no '{key}'")
        out[dit_key] = state[key]
        if dit_key.startswith(EMBEDDERS):
            for i in range(1, depth):
                if not torch.equal(state.get(diffusers_key(dit_key, i), state[key]), state[key]):
                    raise UserError(
                        f"block {i} has its own '{DIFFUSERS_SHARED[dit_key]}': sprintdit's DiT shares one timestep and "
                        f"class embedder"
                    )
    for i in range(depth):
        b = f"transformer_blocks.{i}.attn1."
        for w in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([state[f"{b}to_{n}.{w}"] for n in "qkv"])
        out.update({dit: state[src] for dit, src in diffusers_block_map(i).items()})
    hidden, patch = out["x_embedder.proj.weight"].shape[0], out["x_embedder.proj.weight"].shape[-1]
    side = config["sample_size"] // patch
    out["pos_embed"] = sincos_table((side, side), hidden)[None].float()
    return out


def dit_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of diffusers_to_dit (pos_embed dropped: diffusers computes it); embedders copied into every block."""
    out = {}
    for dit_key in DIFFUSERS_SHARED:
        for i in range(depth if dit_key.startswith(EMBEDDERS) else 1):
            out[diffusers_key(dit_key, i)] = state[
                dit_key
            ].clone()  # own storage per block (safetensors refuses shared tensors)
    for i in range(depth):
        for w in ("weight", "bias"):
            for n, part in zip("qkv", state[f"blocks.{i}.attn.qkv.{w}"].chunk(3)):
                out[f"transformer_blocks.{i}.attn1.to_{n}.{w}"] = part
        out.update({src: state[dit] for dit, src in diffusers_block_map(i).items()})
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------- architecture


def tensor(state: dict, key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"not a {source} checkpoint: it has no '{key}' (first keys: {', '.join(list(state)[:3])})")
    if state[key].dim() != ndim:
        raise UserError(
            f"'{key}' has shape {list(state[key].shape)}; a {source} checkpoint has a {ndim}-d tensor there"
        )
    return state[key]


def block_count(state: dict, prefix: str) -> int:
    """Number of blocks `prefix.{i}.*`, checking the indices run 0..n-1."""
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise UserError(f"'{prefix}' block indices are not 0..{len(found) - 1}: {sorted(found)[:8]}")
    return len(found)


def stage_prefixes(state: dict, source: str) -> list[str]:
    """Source prefixes of our blocks 0..depth-1, in order."""
    if source != "sprint":
        return [f"blocks.{i}." for i in range(block_count(state, "blocks"))]
    return [f"{stage}.{i}." for stage in SPRINT_STAGES for i in range(block_count(state, stage))]


def patch_geometry(state: dict, opts: ConvertOptions) -> tuple[int, int, int]:
    """(hidden size, patch size, input channels) from the patch embedding."""
    if opts.source == "sprint":  # Linear on C*p*p patch features
        hidden, features = tensor(state, "x_embedder.proj.weight", 2, opts.source).shape
        p = opts.patch_size or SPRINT_PATCH_SIZE
        if features % (p * p):
            raise UserError(
                f"x_embedder.proj.weight has {features} patch features, not a multiple of patch size {p} squared"
            )
        return hidden, p, features // (p * p)
    hidden, channels, p, q = tensor(state, "x_embedder.proj.weight", 4, opts.source).shape  # Conv2d
    if p != q or opts.patch_size not in (None, p):
        raise UserError(
            f"x_embedder.proj.weight has shape {[hidden, channels, p, q]}: patch {p}x{q}, not "
            f"{opts.patch_size or 'square'}"
        )
    return hidden, p, channels


def input_grid(state: dict, opts: ConvertOptions, patch: int) -> list[int]:
    if opts.source == "sprint" and opts.input_size is None:
        raise UserError(
            "the SPRINT release stores no positions: give --input-size (32 for 256px SD-VAE latents, 64 for 512px)"
        )
    if opts.source == "sprint":
        return list(opts.input_size)
    tokens = tensor(state, "pos_embed", 3, opts.source).shape[1]
    frames = [tensor(state, "temp_embed", 3, opts.source).shape[1]] if opts.source == "latte" else []
    if opts.input_size is not None and frames:
        raise UserError("a Latte checkpoint's frames and grid are its temp_embed's and pos_embed's: drop --input-size")
    if opts.input_size is not None:
        given = math.prod(s // patch for s in opts.input_size)
        if given != tokens:
            raise UserError(
                f"pos_embed has {tokens} positions but --input-size {opts.input_size} at patch {patch} gives {given}"
            )
        return list(opts.input_size)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"pos_embed has {tokens} positions, not a square grid: give --input-size H,W")
    return [*frames, side * patch, side * patch]


def head_count(
    state: dict, opts: ConvertOptions, preset: Optional[str], hidden: int, first_block: str, notes: list[str]
) -> int:
    """From the per-head q_norm weight when there is one, else --num-heads, the preset, or the size of that width."""
    if f"{first_block}attn.q_norm.weight" in state:
        head_dim = state[f"{first_block}attn.q_norm.weight"].shape[0]
        if hidden % head_dim or opts.num_heads not in (None, hidden // head_dim):
            raise UserError(
                f"'{first_block}attn.q_norm.weight' gives head dim {head_dim}, which does not fit width {hidden} / "
                f"{opts.num_heads} heads"
            )
        return hidden // head_dim
    if opts.num_heads is not None:
        return opts.num_heads
    if preset is not None:
        return PRESETS[preset]["num_heads"]
    by_width = {d: (name, heads) for name, (d, _, heads) in SIZES.items()}
    if hidden not in by_width:
        raise UserError(
            f"width {hidden} is no preset size's: give --num-heads (the head count is not stored in the weights)"
        )
    name, heads = by_width[hidden]
    notes.append(f"{heads} heads assumed (size {name} has width {hidden}); give --num-heads if the run used another")
    return heads


def canonical_preset(name: Optional[str]) -> Optional[str]:
    """`DiT-XL/2` and `SiT-XL/2` name the same sizes; ours are called SiT-*."""
    if name is None:
        return None
    preset = "SiT-" + name.split("-", 1)[1] if name.startswith("DiT-") else name
    if preset not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (or DiT-*)")
    return preset


def infer_model_config(state: dict, opts: ConvertOptions, notes: list[str]) -> ModelConfig:
    """Our model config for the tensors of a source checkpoint (sizes from shapes, conventions from the source)."""
    preset = canonical_preset(opts.preset)
    hidden, patch, channels = patch_geometry(state, opts)
    prefixes = stage_prefixes(state, opts.source)
    if not prefixes:
        raise UserError(f"not a {opts.source} checkpoint: it has no transformer blocks")
    first = prefixes[0]
    out_rows = tensor(state, "final_layer.linear.weight", 2, opts.source).shape[0]
    if out_rows not in (patch * patch * channels, 2 * patch * patch * channels):
        raise UserError(
            f"final_layer.linear.weight has {out_rows} rows; patch {patch} and {channels} channels need "
            f"{patch * patch * channels} or twice that"
        )
    sizes = dict(hidden_size=hidden, depth=len(prefixes), patch_size=patch)
    if preset is not None and any(sizes[k] != PRESETS[preset][k] for k in sizes):
        raise UserError(f"the tensors give {sizes}, not preset {preset}'s {PRESETS[preset]}")
    fusion = "concat_linear" if "renoise_linear.weight" in state else "none"
    cfg = ModelConfig(
        **sizes,
        input_size=input_grid(state, opts, patch),
        in_channels=channels,
        num_classes=tensor(state, LABELS, 2, opts.source).shape[0] - 1,  # + the null row
        num_heads=head_count(state, opts, preset, hidden, first, notes),
        mlp_ratio=tensor(state, f"{first}mlp.fc1.weight", 2, opts.source).shape[0] / hidden,
        mlp="gelu",
        pos_embed="rope" if opts.source == "sprint" else "sincos",
        qk_norm=f"{first}attn.q_norm.weight" in state,
        learn_sigma=out_rows == 2 * patch * patch * channels,
        time_scale=float(DDPM_STEPS) if opts.source in DDPM_SOURCES else 1.0,
        pos_base=None,
        video_layout="factorised" if opts.source == "latte" else "joint",
        sprint=SprintConfig(
            encoder_depth=block_count(state, SPRINT_STAGES[0]) if opts.source == "sprint" else 0,
            decoder_depth=block_count(state, SPRINT_STAGES[2]) if opts.source == "sprint" else 0,
            fusion=fusion,
            path_drop_prob=SPRINT_PATH_DROP if fusion == "concat_linear" else 0.0,
        ),
    )
    cfg = resolve_model_config(cfg)
    matching = next((name for name, p in PRESETS.items() if p == {k: getattr(cfg, k) for k in p}), None)
    return replace(cfg, preset=matching)  # names the sizes; every size is set explicitly


# ----------------------------------------------------------------------------------- weights


def key_map(cfg: ModelConfig, source: str, prefixes: list[str]) -> dict[str, str]:
    """Our key prefix -> the source's, for the renamed parts (blocks, fusion)."""
    renamed = {f"blocks.{i}.": prefix for i, prefix in enumerate(prefixes)}
    if source == "sprint" and cfg.sprint.fusion == "concat_linear":
        renamed["fusion."] = "renoise_linear."
    return renamed


def rename(key: str, mapping: dict[str, str], inverse: bool = False) -> str:
    for new, old in mapping.items():
        src, dst = (new, old) if inverse else (old, new)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def source_shapes(cfg: ModelConfig, source: str, mapping: dict[str, str]) -> dict[str, torch.Size]:
    """Every key (source naming) and shape a source checkpoint of this architecture has, bar DROPPED ones."""
    with torch.device("meta"):
        ours = SiT(cfg).state_dict()
    shapes = {rename(k, mapping, inverse=True): v.shape for k, v in ours.items()}
    if source != "sprint":  # Conv2d patch embedding, fixed positions, no MASK token
        d, p = cfg.hidden_size, cfg.patch_size
        shapes["x_embedder.proj.weight"] = torch.Size([d, cfg.in_channels, p, p])
        shapes["pos_embed"] = torch.Size([1, cfg.frame_tokens if source == "latte" else cfg.num_tokens, d])
        if source == "latte":
            shapes["temp_embed"] = torch.Size([1, cfg.grid[0], d])
        del shapes["mask_token"]
    return shapes


def check_layout(state: dict, cfg: ModelConfig, source: str, mapping: dict[str, str]) -> None:
    """Every source key known and present with the shape this architecture needs: nothing dropped silently."""
    expected = source_shapes(cfg, source, mapping)
    for key in state:
        if key not in expected and not key.startswith(DROPPED[source]):
            raise UserError(f"unexpected '{key}' in a {source} checkpoint (no counterpart in our network)")
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"the {source} checkpoint lacks '{key}' (shape {list(shape)} for this model)")
        if state[key].shape != shape:
            raise UserError(f"'{key}' has shape {list(state[key].shape)}; this model needs {list(shape)} there")


def check_pos_embed(pos: torch.Tensor, cfg: ModelConfig) -> None:
    grid = position_grid(cfg)  # Latte's table is one frame's
    diff = (pos[0].double() - sincos_table(grid, cfg.hidden_size).double()).abs().max().item()
    if diff > POS_EMBED_ATOL:
        raise UserError(
            f"pos_embed is not the fixed 2D sin-cos table of a {cfg.grid[0]}x{cfg.grid[1]} grid (max difference "
            f"{diff:.3g}); was it trained?"
        )


def check_time_table(table: torch.Tensor, cfg: ModelConfig) -> None:
    """Latte's temp_embed (1, F, D) must be the fixed 1D sin-cos table our first time block adds."""
    diff = (table[0].double() - time_table(cfg.grid[0], cfg.hidden_size).double()).abs().max().item()
    if diff > POS_EMBED_ATOL:
        raise UserError(
            f"temp_embed is not the fixed sin-cos table of {cfg.grid[0]} frames (max difference {diff:.3g})"
        )


def fold_sit_time(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights whose output at t is minus SiT's at 1 - t on the velocity channels (see the module docstring).

    cos((1-t)w) = cos(w) cos(tw) + sin(w) sin(tw) and sin((1-t)w) = sin(w) cos(tw) - cos(w) sin(tw), so the
    first timestep layer W = [W_cos, W_sin] becomes [W_cos cos(w) + W_sin sin(w), W_cos sin(w) - W_sin cos(w)].
    """
    out = dict(state)
    half = TIMESTEP_FREQ_DIM // 2
    w = timestep_frequencies(half).double()  # (half,)
    first = state["t_embedder.mlp.0.weight"].double()  # (D, 2 * half): [cos features, sin features]
    w_cos, w_sin = first[:, :half], first[:, half:]
    out["t_embedder.mlp.0.weight"] = torch.cat(
        [w_cos * w.cos() + w_sin * w.sin(), w_cos * w.sin() - w_sin * w.cos()], dim=1
    ).float()
    velocity_rows = cfg.in_channels * cfg.patch_size**2  # our order (c, p_row, p_col): channels < C first
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sign = torch.ones(state[name].shape[0])
        sign[:velocity_rows] = -1
        out[name] = state[name] * sign.reshape(-1, *([1] * (state[name].dim() - 1)))
    return out


def convert_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, source: str, notes: list[str]
) -> dict[str, torch.Tensor]:
    """Source tensors -> our state dict (float32); the layout is checked first, so every step below is exact."""
    mapping = key_map(cfg, source, stage_prefixes(state, source))
    check_layout(state, cfg, source, mapping)
    dropped = [k for k in state if k.startswith(DROPPED[source])]
    if dropped:
        notes.append(
            f"dropped the REPA projection head ({len(dropped)} tensors under projectors.): our network has none"
        )
    out = {rename(k, mapping): v.float() for k, v in state.items() if k not in dropped}
    if source != "sprint":
        check_pos_embed(out.pop("pos_embed"), cfg)
        if source == "latte":
            check_time_table(out.pop("temp_embed"), cfg)
        # (D, C, p, p) -> (D, C*p*p), same order
        out["x_embedder.proj.weight"] = out["x_embedder.proj.weight"].flatten(1)
        for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
            out[name] = dit_final_rows(out[name], cfg.patch_size)
        out["mask_token"] = (
            torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(MASK_TOKEN_SEED))
            * cfg.sprint.mask_token_std
        )
    return fold_sit_time(out, cfg) if source == "sit" else out


def convert(path: Path, opts: ConvertOptions) -> Converted:
    """Read a released checkpoint and convert its model (and EMA) weights; nothing is written."""
    if opts.source not in SOURCES:
        raise UserError(f"unknown source {opts.source!r}; choose one of {', '.join(SOURCES)}")
    if opts.source == "diffusers":
        return convert_diffusers(path, opts)
    if opts.source == "pixart":
        return convert_pixart(path, opts)
    model_state, ema_state = state_dicts(read_checkpoint(path), path)
    if opts.source == "latte" and T2V_KEY in ema_state:
        return convert_latte_t2v(model_state, ema_state, opts, path)
    if opts.input_size is not None and len(opts.input_size) != 2:
        raise UserError(f"--input-size {opts.input_size}: give N or H,W (F,H,W is for Latte's text-to-video .pt)")
    notes: list[str] = []
    if opts.source == "latte" and LABELS not in ema_state:  # unconditional: one class, embedded as zero
        same, table = (
            model_state is ema_state,
            {LABELS: torch.zeros(2, tensor(ema_state, "pos_embed", 3, "latte").shape[2])},
        )
        ema_state = {**ema_state, **table}
        model_state = ema_state if same else {**model_state, **table}
        notes.append("unconditional Latte: one class with a zero embedding (sample with --labels 0 --guidance none)")
    cfg = infer_model_config(ema_state, opts, notes)
    ema = convert_weights(ema_state, cfg, opts.source, notes)
    model = ema if model_state is ema_state else convert_weights(model_state, cfg, opts.source, [])
    return Converted(cfg, model, ema, notes)


def convert_latte_t2v(model_state: dict, ema_state: dict, opts: ConvertOptions, path: Path) -> Converted:
    """Vchitect/Latte's own text-to-video checkpoint (models/latte_t2v.py; diffusers' key names) as a diffusers
    LatteTransformer3DModel of the config its tensors give (sprintdit/latte.py `t2v_checkpoint_config`)."""
    config = t2v_checkpoint_config(ema_state, opts.input_size, opts.num_heads)
    cfg = latte_model_config(config, None, opts.caption_tokens or PIXART_CAPTION_TOKENS)
    ema = latte_to_ours(ema_state, cfg, str(path))
    model = ema if model_state is ema_state else latte_to_ours(model_state, cfg, str(path))
    frames, side = cfg.input_size[0], cfg.input_size[1]
    notes = [
        f"Latte text-to-video: {frames} frames of {side}x{side} latents"
        + ("" if opts.input_size else " (not stored: Latte-1's; --input-size F,H,W if not)"),
        f"{cfg.num_heads} attention heads"
        + ("" if opts.num_heads else " (not stored: width / 72; --num-heads if not)"),
    ]
    if opts.text_encoder_path is None:
        notes.append("the unconditional caption is unset: sampling with guidance fills it from --text-encoder-path")
    else:
        ema["y_embedder.empty"] = model["y_embedder.empty"] = empty_caption(cfg, opts.text_encoder_path)
    return Converted(cfg, model, ema, notes)


def convert_pixart(path: Path, opts: ConvertOptions) -> Converted:
    """PixArt-alpha / Sigma's original checkpoint (.pth: a state dict or its training dict state_dict /
    state_dict_ema)."""
    model_state, ema_state = state_dicts(read_checkpoint(path), path, ORIGINAL_ENTRIES)
    cfg = original_model_config(ema_state, opts.input_size, opts.num_heads, str(path))
    ema = original_to_ours(ema_state, cfg, str(path))
    model = ema if model_state is ema_state else original_to_ours(model_state, cfg, str(path))
    notes = [
        f"the unconditional caption is the release's learned y_embedding, masked to each prompt's length as the "
        f"release samples (model.text.null_caption learned); lewei_scale {cfg.pos_interpolation:g}, base grid "
        f"{cfg.pos_base}",
    ]
    if opts.num_heads is None:
        notes.append(f"{cfg.num_heads} attention heads (width / {PIXART_HEAD_DIM}, PixArt-XL's); --num-heads if not")
    return Converted(cfg, model, ema, notes)


def convert_diffusers(path: Path, opts: ConvertOptions) -> Converted:
    state, config = read_diffusers(Path(path))
    text_models = {
        PIXART_CLASS: (pixart_model_config, pixart_to_ours),
        LATTE_CLASS: (latte_model_config, latte_to_ours),
    }
    if config.get("_class_name") in text_models:
        model_config, to_ours = text_models[config["_class_name"]]
        cfg = model_config(config, opts.input_size, opts.caption_tokens or PIXART_CAPTION_TOKENS)
        weights = to_ours(state, cfg, str(path))
        if opts.text_encoder_path is None:
            notes = [
                "the unconditional caption is unset: sampling with guidance fills it from --text-encoder-path (the "
                "empty prompt's embedding, as diffusers' pipeline does); a training run from its data"
            ]
        else:
            weights["y_embedder.empty"] = empty_caption(cfg, opts.text_encoder_path)
            notes = [f"the unconditional caption is the empty prompt's embedding by {opts.text_encoder_path}"]
        return Converted(cfg, weights, weights, notes)
    dit = diffusers_to_dit(state, config)
    side = config["sample_size"]
    notes = [
        f"diffusers' final LayerNorm has eps {DIFFUSERS_FINAL_NORM_EPS:g}, its blocks' "
        f"{config.get('norm_eps', DIFFUSERS_NORM_EPS):g}: ours uses the latter for both"
    ]
    dit_opts = replace(
        opts,
        source="dit",
        num_heads=opts.num_heads or config["num_attention_heads"],
        input_size=opts.input_size or [side, side],
    )
    cfg = infer_model_config(dit, dit_opts, notes)
    cfg = replace(cfg, norm_eps=float(config.get("norm_eps", DIFFUSERS_NORM_EPS)), time_freq_shift=1)
    weights = convert_weights(dit, cfg, "dit", notes)
    return Converted(cfg, weights, weights, notes)


def export_diffusers(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json) of a DiTTransformer2DModel computing what the dense DiT-style model `cfg` computes,
    with diffusers' timestep = t * model.time_scale; a PixArt-layout model (adaln single) as
    PixArtTransformer2DModel."""
    if cfg.adaln == "single" and cfg.video_layout == "factorised":
        return ours_to_latte(weights, cfg), latte_diffusers_config(cfg)
    if cfg.adaln == "single":
        return ours_to_pixart(weights, cfg), pixart_diffusers_config(cfg)
    needs = {
        "arch": (cfg.arch, "sit"),
        "sprint.fusion": (cfg.sprint.fusion, "none"),
        "pos_embed": (cfg.pos_embed, "sincos"),
        "qk_norm": (cfg.qk_norm, False),
        "mlp": (cfg.mlp, "gelu"),
        "time_freq_shift": (cfg.time_freq_shift, 1),
    }
    wrong = [f"model.{k} is {have!r} (needs {want!r})" for k, (have, want) in needs.items() if have != want]
    if wrong or cfg.input_size[0] != cfg.input_size[1]:
        why = "; ".join(wrong) or f"model.input_size {cfg.input_size} is not square"
        raise UserError(
            f"{DIFFUSERS_CLASS} cannot hold this model: {why} (time_freq_shift 1: diffusers' timestep frequencies)"
        )
    dit = {k: v for k, v in weights.items() if k != "mask_token"}
    dit["x_embedder.proj.weight"] = dit["x_embedder.proj.weight"].reshape(
        cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.patch_size
    )
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        dit[name] = ours_to_dit_rows(dit[name], cfg.patch_size)
    config = {
        "_class_name": DIFFUSERS_CLASS,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "sample_size": cfg.input_size[0],
        "patch_size": cfg.patch_size,
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_eps": cfg.norm_eps,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "dropout": 0.0,
    }
    return dit_to_diffusers(dit, cfg.depth), config


# ----------------------------------------------------------------------------------- run folder


def run_config(model: ModelConfig, source: str) -> RunConfig:
    """A run config for converted weights: the source's objective and a guidance the network supports."""
    objective = {
        "dit": ObjectiveConfig(kind="ddpm"),
        "latte": ObjectiveConfig(kind="ddpm"),
        "diffusers": ObjectiveConfig(kind="ddpm"),
        "pixart": ObjectiveConfig(kind="ddpm"),
        "sit": ObjectiveConfig(time_sampling="uniform"),  # SiT trains on uniform t
        "sprint": ObjectiveConfig(),  # the release's logit-normal ("lognormal") t
    }[source]
    sample = (
        SampleConfig()
        if model.sprint.fusion == "concat_linear"
        else SampleConfig(guidance="cfg", scale=DENSE_GUIDANCE_SCALE)
    )
    if source in ("dit", "diffusers", "pixart", "latte"):
        sample = replace(sample, sampler="ddpm", steps=DIT_SAMPLING_STEPS)
    if model.adaln == "single":  # PixArt's own sampling: DPM-Solver++ at 20 steps, CFG 4.5
        sample = replace(sample, sampler="dpm-solver++", steps=PIXART_SAMPLING_STEPS, scale=PIXART_GUIDANCE_SCALE)
    # the releases model the SD VAE's 4-channel latents (decoded with --vae: the weights come without data or VAE);
    # other channel counts are sampled as pixels
    data = DataConfig(name="latents" if model.in_channels == SD_LATENT_CHANNELS else "image_folder", root="")
    return RunConfig(model=model, objective=objective, data=data, sample=sample)


def write_run(out: Path, converted: Converted, source: str) -> Path:
    """A checkpoint folder (config.yaml, model/ema.safetensors) for sampling, evaluation, `sparsify` and
    `train.init_from`; it holds no training state to resume."""
    return save_weights_folder(
        Path(out), converted.weights, converted.ema, to_yaml(run_config(converted.model, source))
    )


def describe(converted: Converted, source: str) -> str:
    """One line: preset-like name, sizes, parameter count."""
    m = converted.model
    name = (m.preset or "custom").replace("SiT-", "DiT-") if source in ("dit", "diffusers") else m.preset or "custom"
    params = sum(v.numel() for k, v in converted.ema.items() if k != "mask_token")
    split = (
        f", blocks {m.sprint.encoder_depth}/{m.middle_depth}/{m.sprint.decoder_depth}"
        if m.sprint.fusion == "concat_linear"
        else ""
    )
    sigma = ", learned sigma" if m.learn_sigma else ""
    sizes = "x".join(map(str, [m.in_channels, *m.input_size]))  # C x H x W, video C x F x H x W
    layout = ", space / time blocks" if m.video_layout == "factorised" else ""
    if m.condition == "text":
        name = f"{'Latte' if m.video else 'PixArt'}-layout {name}" if m.adaln == "single" else name
        return (
            f"{source} {name} (width {m.hidden_size}, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}, "
            f"input {sizes}{layout}, {m.text.encoder} captions of width {m.text.dim}{sigma}), {params / 1e6:.2f}M params"
        )
    return (
        f"{source} {name} (width {m.hidden_size}, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}, "
        f"input {sizes}{layout}, {m.num_classes} classes{sigma}{split}), {params / 1e6:.2f}M params"
    )
