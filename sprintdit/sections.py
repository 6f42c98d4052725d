"""The typed sections of a run config that the library's modules own: `model` (with its `sprint`, `repa`, `text` and
`sparse` subsections; the network in models/sit.py, its cross-field rules in `resolve_model_config` there),
`objective` (objective.py) and `sample` (sampling.py). Plain dataclasses with the checks of their own fields, so
config.py, the foundation, reads and validates a run config without importing a network, an objective or a sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

from .density import SparseConfig, parse_keep
from .errors import UserError
from .masking import achievable_structured_ratios, keep_levels


@dataclass
class SprintConfig:
    """SPRINT: `blocks` split into a dense encoder, a middle on the kept tokens and a dense decoder, the two paths
    fused."""

    encoder_depth: int = 2  # dense shallow blocks; middle depth = depth - encoder_depth - decoder_depth
    decoder_depth: int = 2
    fusion: str = "concat_linear"  # concat_linear (SPRINT) | none (naive token dropping; with no mask, a dense SiT)
    path_drop_prob: float = 0.1  # per-sample probability of replacing the sparse path by MASK in training
    mask_token_std: float = 0.02  # the fixed (untrained) MASK token is drawn from N(0, std^2)


@dataclass
class RepaConfig:
    """REPA: an MLP projects the output of one block onto frozen DINOv2 features stored with the data."""

    depth: int = 0  # the block whose output is aligned (1-based; 0 = off; REPA uses 8 for XL)
    dim: Optional[int] = None  # width of the targets (DINOv2's D); default: the data's features
    hidden: int = 2048  # projector: Linear(D, H) SiLU Linear(H, H) SiLU Linear(H, dim)


@dataclass
class TextConfig:
    """Text conditioning (model.condition text): every block cross-attends from the image tokens to the caption's."""

    # learned: word embeddings and a small transformer trained with the model (closed vocabularies) | t5 | clip:
    # embeddings precomputed by `sprintdit prepare --captions`
    encoder: str = "learned"
    # learned: the words, in token order (ids 2, 3, ...; 0 pads, 1 starts); default: the data's
    vocabulary: Optional[List[str]] = None
    # caption tokens (learned: including the start token; t5, clip: the tokenizer's); longer captions are truncated;
    # default for t5, clip: the data's
    max_tokens: int = 16
    depth: int = 2  # learned: transformer layers over the caption
    # t5, clip: the local transformers folder the embeddings came from (sampling encodes prompts with it); default: the
    # data's
    path: Optional[str] = None
    dim: Optional[int] = None  # t5, clip: the embedding width (T5-XXL: 4096); default: the data's
    # also add the caption's mean kept token, through a linear layer, to the timestep embedding (as SD3 and Flux add a
    # pooled text vector); PixArt-alpha: off
    pooled: bool = False
    # t5, clip: what the unconditional pass reads. encoded: the encoder's embedding of the empty text with its own
    # padding (diffusers' pipelines: the empty negative prompt); learned: the network's fixed table (PixArt's original
    # release, y_embedding), masked to the length of the caption it stands in for, as that release trains and samples
    null_caption: str = "encoded"
    # t5, clip: padding rows (zero) masked out of the cross-attention; false: every row attended, as diffusers' Latte
    # (its pipeline passes no caption mask: padding rows, zeroed or not, are keys like any other)
    mask_padding: bool = True


@dataclass
class ModelConfig:
    arch: str = "sit"  # sit (dense / SPRINT) | sparsedit (SparseDiT; see model.sparse and sprintdit.models.sparsedit)
    # class (a label table added to the timestep embedding) | text (cross-attention to a caption; model.text)
    condition: str = "class"
    preset: Optional[str] = None  # e.g. "SiT-XL/2": fills hidden_size, depth, num_heads, patch_size left unset
    # [H, W] of the model input (pixels or latents), or [F, H, W] for video; default: the data's
    input_size: Optional[List[int]] = None
    in_channels: Optional[int] = None  # default: the data's
    num_classes: Optional[int] = None  # default: the data's; the label num_classes is the null (unconditional) class
    patch_size: Optional[int] = None
    patch_size_t: int = 1  # video: frames per token (Latte: 1)
    # video: joint (every block attends over all space-time tokens) | factorised (Latte: blocks alternate, even ones
    # attend within each frame and cross-attend to the caption, odd ones across the frames at each position; the
    # frames' table is added before the first temporal block; sin-cos positions, one frame per token)
    video_layout: str = "joint"
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # gelu (tanh approximation) | swiglu
    pos_embed: str = "rope"  # rope (2D or 3D, every block) | sincos (fixed 2D or 3D absolute, added once)
    # sincos: the grid the positions are scaled to (PixArt's base size: position i of n along an axis is
    # i * pos_base / n / pos_interpolation); None: positions 0, 1, 2, ... (DiT)
    pos_base: Optional[int] = None
    pos_interpolation: float = 1.0  # sincos with pos_base: PixArt's interpolation_scale
    # zero: each block's own SiLU-Linear of the conditioning (DiT's adaLN-Zero) | single: one shared SiLU-Linear to
    # 6 x hidden_size plus a learned table per block, and the final layer's own table on the timestep embedding
    # (PixArt-alpha's adaLN-single)
    adaln: str = "zero"
    # PixArt-alpha 1024's micro-conditions: the image's height, width and aspect ratio (pixels: input_size x
    # micro_scale), each through a timestep-style MLP to hidden_size / 3, added to the timestep embedding
    micro_conditions: bool = False
    micro_scale: int = 8  # pixels per latent (SD-VAE: 8)
    rope_theta: float = 10000.0
    qk_norm: bool = True  # per-head RMSNorm on q and k
    learn_sigma: bool = False  # doubles the output channels (DiT); flow matching uses the first half
    norm_eps: float = 1e-6
    init_std: float = 0.02  # normal init of the timestep MLP
    label_init_std: float = 0.02  # normal init of the label table (larger: class conditioning is learned sooner)
    time_scale: float = 1.0  # t is multiplied by this before the sinusoidal embedding (SiT: 1; DiT-style: 1000)
    # timestep frequencies exp(-ln(10000) i / (half - shift)): 0 as DiT and SiT, 1 as diffusers' DiT
    time_freq_shift: int = 0
    # arch sit: the encoder / middle / decoder split and the fusion
    sprint: SprintConfig = field(default_factory=SprintConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)  # arch sit: representation alignment (off by default)
    sparse: SparseConfig = field(default_factory=SparseConfig)  # arch sparsedit only
    text: TextConfig = field(default_factory=TextConfig)  # condition text only

    @property
    def video(self) -> bool:
        return len(self.input_size) == 3

    @property
    def patch(self) -> tuple[int, ...]:
        """Input elements per token along each axis: (p, p), or (patch_size_t, p, p) for video."""
        return (self.patch_size_t,) * self.video + (self.patch_size, self.patch_size)

    @property
    def grid(self) -> tuple[int, ...]:
        """The token grid: (rows, columns), or (frames, rows, columns) for video."""
        return tuple(s // p for s, p in zip(self.input_size, self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame (all tokens of an image model)."""
        return math.prod(self.grid[-2:])

    @property
    def middle_depth(self) -> int:
        return self.depth - self.sprint.encoder_depth - self.sprint.decoder_depth

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def at_frames(self, frames: int | None) -> "ModelConfig":
        """This video model's config for clips of `frames` frames (None: as it is); the weights are the same."""
        return self if frames is None else replace(self, input_size=[frames, *self.input_size[1:]])

    def mask_grid(self) -> tuple[tuple[int, ...], int]:
        """(the grid a token mask is drawn on, how many frames it is tiled over): the token grid once, or for the
        factorised layout one frame's grid tiled over every frame, so that the middle keeps the same positions in
        each frame and a time block's sequences stay whole."""
        if self.video_layout == "factorised":
            return self.grid[1:], self.grid[0]
        return self.grid, 1

    def token_grid(self, tokens: int) -> tuple[int, ...]:
        """The grid of a forward's `tokens` tokens: the model's, or a shorter clip's first token frames."""
        return (tokens // self.frame_tokens, *self.grid[1:]) if self.video else self.grid


# ----------------------------------------------------------------------------------- objective

KINDS = ("flow", "ddpm")

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class ObjectiveConfig:
    kind: str = "flow"  # flow (flow matching, velocity) | ddpm (epsilon + learned sigma, DiT)
    path: str = "linear"  # linear: x_t = (1-t) x0 + t eps | cosine: cos(pi t/2) x0 + sin(pi t/2) eps
    time_sampling: str = "logit_normal"  # uniform | logit_normal (the SPRINT release's "lognormal")
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    label_dropout: float = 0.1  # probability of training on the null label (enables guidance)
    num_timesteps: int = 1000  # ddpm: diffusion steps T
    beta_start: float = 1e-4  # ddpm: linear betas from beta_start to beta_end
    beta_end: float = 0.02
    repa_weight: float = 0.5  # REPA alignment loss weight (used when model.repa.depth > 0)
    # video: correlation of the noise between any two frames (a mixed noise prior); 0: independent
    frame_noise_corr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"objective.kind is {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.num_timesteps < 2 or not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UserError("objective: ddpm needs num_timesteps >= 2 and 0 < beta_start <= beta_end < 1")
        if self.path not in PATHS:
            raise UserError(f"objective.path is {self.path!r}; choose one of {', '.join(PATHS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserError(
                f"objective.time_sampling is {self.time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"objective.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.repa_weight < 0:
            raise UserError(f"objective.repa_weight must be >= 0, got {self.repa_weight}")
        if self.logit_std <= 0:
            raise UserError(f"objective.logit_std must be positive, got {self.logit_std}")
        if not 0.0 <= self.frame_noise_corr < 1.0:
            raise UserError(f"objective.frame_noise_corr must be in [0, 1), got {self.frame_noise_corr}")


# ----------------------------------------------------------------------------------- sampling

FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")
ADAPTIVE_SAMPLERS = ("dopri5",)  # step sizes chosen by the error estimate: the network count depends on the network
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")  # dpm-solver++'s choice of steps, as diffusers names them
SAMPLERS = FLOW_SAMPLERS + DDPM_SAMPLERS
GUIDANCES = ("none", "cfg", "pdg")
MIDDLE_MASKS = ("varying", "fixed")  # sample.middle_mask: which tokens of each group the thinned middle keeps


@dataclass
class SampleConfig:
    # flow: euler | heun | dopri5 (adaptive, torchdiffeq; steps unused) (ODE) | sde (Euler-Maruyama, SiT's); ddpm
    # objective: ddpm | ddim (DiT's respacing) | dpm-solver++ (2M multistep, PixArt's default at 20 steps)
    sampler: str = "euler"
    steps: int = 50
    guidance: str = "pdg"  # none | cfg (classifier-free) | pdg (Path-Drop Guidance)
    scale: float = 2.0  # v = v_uncond + scale (v_cond - v_uncond) (DDPM: on eps)
    interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [low, high]
    sde_last_t: float = 0.04  # the SDE's noisy steps end here; a last deterministic step reaches t = 0
    atol: float = 1e-6  # dopri5: absolute and relative error tolerances per step (SiT's ODE sampler defaults)
    rtol: float = 1e-3
    batch_size: int = 64
    # dpm-solver++: the T training steps it visits: linspace (PixArt's, diffusers' default) | leading | trailing
    timestep_spacing: str = "linspace"
    # SPRINT: the share of the tokens the middle blocks see at each step (sprintdit.density): "1" (all), a constant
    # "0.25", "0.25:1" (SparseDiT's form: 0.25 at pure noise, rising linearly to 1 at t = 1/4) or knots "t=keep,..."
    middle_keep: str = "1"
    # varying: a fresh structured draw at every step (seeded by t) | fixed: the same tokens at every step; one draw
    # for every sample, so an image depends only on its seed and label
    middle_mask: str = "varying"
    middle_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # thin the middle only for t in it

    def __post_init__(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(f"timestep_spacing {self.timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if self.guidance not in GUIDANCES:
            raise UserError(f"guidance {self.guidance!r} is unknown; choose one of {', '.join(GUIDANCES)}")
        if not (self.atol > 0 and self.rtol > 0):
            raise UserError(f"sampling tolerances atol and rtol must be > 0, got {self.atol} and {self.rtol}")
        if not math.isfinite(self.scale):
            raise UserError(f"guidance scale must be a finite number, got {self.scale}")
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"sampling steps and batch size must be >= 1, got {self.steps} and {self.batch_size}")
        if len(self.interval) != 2 or not 0.0 <= self.interval[0] <= self.interval[1] <= 1.0:
            raise UserError(f"guidance interval must be [low, high] within [0, 1], got {list(self.interval)}")
        if self.sampler == "sde" and not 0.0 < self.sde_last_t < 1.0:
            raise UserError(f"sde_last_t must be in (0, 1), got {self.sde_last_t}")
        self.middle_keep = str(self.middle_keep)
        parse_keep(self.middle_keep)
        if self.middle_mask not in MIDDLE_MASKS:
            raise UserError(f"middle_mask {self.middle_mask!r} is unknown; choose one of {', '.join(MIDDLE_MASKS)}")
        if len(self.middle_interval) != 2 or not 0.0 <= self.middle_interval[0] <= self.middle_interval[1] <= 1.0:
            raise UserError(f"middle interval must be [low, high] within [0, 1], got {list(self.middle_interval)}")


def check_sampling(model: ModelConfig, objective_kind: str, sample: SampleConfig) -> None:
    """The rules between a model, its objective and sampling settings, for a run config and for a network about to
    sample alike: PDG and a thinned middle need SPRINT's fusion (the dense path they fall back on), a thinned middle's
    sparsest keep ratio a structured mask of the token grid, the sampler must fit the objective."""
    keep = parse_keep(sample.middle_keep)
    if not keep.dense and (model.arch != "sit" or model.sprint.fusion == "none"):
        raise UserError(
            f"middle_keep {sample.middle_keep!r} thins SPRINT's middle blocks: it needs model.arch 'sit' with "
            f"model.sprint.fusion 'concat_linear'; use middle_keep 1"
        )
    if not keep.dense and model.input_size is not None and model.patch_size is not None:  # else: when it samples
        try:
            keep_levels(model.grid, keep.sparsest)
        except UserError:
            keeps = ", ".join(f"{float(1 - r):g}" for r in achievable_structured_ratios(model.grid, max_group=4)[1:])
            raise UserError(
                f"middle_keep {sample.middle_keep!r}: keep ratio {keep.sparsest:g} is not a structured mask of the "
                f"{'x'.join(map(str, model.grid))} token grid; with groups up to 4x4: {keeps}"
            ) from None
    if sample.guidance == "pdg" and (model.arch != "sit" or model.sprint.fusion == "none"):
        raise UserError(
            "guidance 'pdg' (Path-Drop Guidance) needs model.sprint.fusion 'concat_linear'; use guidance cfg or none"
        )
    if (sample.sampler in DDPM_SAMPLERS) != (objective_kind == "ddpm"):
        raise UserError(
            f"sampler {sample.sampler!r} does not fit objective.kind {objective_kind!r} (ddpm: "
            f"{' | '.join(DDPM_SAMPLERS)}; flow: {' | '.join(FLOW_SAMPLERS)})"
        )
