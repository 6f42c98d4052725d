"""Typed run configuration: dataclasses, YAML files, dotted `key=value` overrides, validation.

A run config has the sections `model`, `objective`, `data`, `train`, `sample`, `eval`, `distributed` and a
list of `stages`
(e.g. masked pre-training then full-token fine-tuning). Unknown keys and wrong types are rejected with
the offending key and the closest valid one; the resolved config is saved with every run.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .distributed import DistributedConfig
from .errors import UserError, warn
from .masking import MASK_TYPES
from .sections import ModelConfig, ObjectiveConfig, SampleConfig, check_sampling

# the shipped configs (package data; studies under studies/)
CONFIG_DIR = Path(str(resources.files("sprintdit") / "configs"))
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
DATASETS = ("fashion_mnist", "fashion_mnist_layouts", "moving_fashion_mnist", "image_folder", "clip_folder", "latents")
VIDEO_DATASETS = ("moving_fashion_mnist", "clip_folder")
FEATURE_NETWORKS = ("auto", "fmnist", "inception", "dinov2")
LR_DECAYS = ("constant", "cosine")
LOGGERS = ("jsonl", "tensorboard", "wandb")  # train.loggers (sprintdit.tracking); jsonl always
INCEPTION_PYTORCH_FID, INCEPTION_TF = (
    "pytorch-fid",
    "tf",
)  # eval.inception_resize: the preprocessing conventions (metrics/inception.py)
INCEPTION_RESIZES = (INCEPTION_PYTORCH_FID, INCEPTION_TF)
IS_SPLIT_SIZE = 5000  # eval.is_split_size: the ADM evaluator's Inception Score splits (metrics/scores.py)
# The flat model keys of sprintdit 0.1 and their sections now; still read (YAML, overrides, saved configs and
# checkpoints) with a one-line warning, until 0.3.
MOVED_MODEL_KEYS = {
    "encoder_depth": "sprint.encoder_depth",
    "decoder_depth": "sprint.decoder_depth",
    "fusion": "sprint.fusion",
    "path_drop_prob": "sprint.path_drop_prob",
    "mask_token_std": "sprint.mask_token_std",
    "repa_depth": "repa.depth",
    "repa_dim": "repa.dim",
    "repa_hidden": "repa.hidden",
}


@dataclass
class DataConfig:
    # fashion_mnist | fashion_mnist_layouts (captioned 2x2 layouts; sprintdit.layouts) | moving_fashion_mnist (clips;
    # sprintdit.moving) | image_folder | clip_folder | latents (written by `sprintdit prepare`)
    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # IDX files, one folder per class, or a latent folder
    split: str = "train"  # fashion_mnist, moving_fashion_mnist: train | test; fashion_mnist_layouts: train | held_out
    # video data: frames per clip (moving_fashion_mnist: default 8; clip_folder: default the first clip's)
    frames: Optional[int] = None
    # pixels: fashion_mnist pads 28 -> 32; image_folder resizes and centre-crops; latents: as prepared
    resolution: int = 32
    num_workers: int = 0  # data-loading processes (image_folder, latents)
    vae: Optional[str] = None  # latents: the VAE folder that decodes samples (default: the one in the manifest)
    # image_folder: captions.jsonl (model.text.encoder learned) or a folder `prepare --captions` wrote (t5, clip); see
    # sprintdit.captions
    captions: Optional[str] = None


@dataclass
class OptimConfig:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class StageConfig:
    name: str = "pretrain"
    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from warmup_start * lr at the stage's start
    warmup_start: float = 0.01
    decay: str = "constant"  # after warm-up: constant | cosine (to 0 at the stage's last step)
    mask_ratio: float = 0.75  # fraction of tokens the middle blocks drop; 0 = full tokens
    mask_type: str = "structured"  # structured (g x g groups, k kept, random offset) | random
    batch_size: Optional[int] = None  # default: train.batch_size
    # video, SiT: train on each clip's first `frames` frames (fewer tokens per step); default all
    frames: Optional[int] = None
    # the EMA warm-up (train.ema_warmup) starts again here: the average forgets the earlier stages' weights within this
    # stage
    ema_restart: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 64  # GLOBAL images per optimizer step: per-rank micro-batch x world size x grad_accum
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with loss scaling)
    compile: bool = False
    # passed to torch.compile: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    compile_fullgraph: bool = False
    grad_checkpointing: bool = False
    # SparseDiT: each micro-batch draws t from one grid side's stratum (one grid, static shapes; see density.time_gates)
    sparse_gating: bool = False
    ema_decay: float = 0.9999
    # the decay grows with the updates so far (see train.ema_decay_at): a short run's EMA spans its last tenth
    ema_warmup: bool = True
    seed: int = 0
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    log_every: int = 50
    ckpt_every: int = 1000  # also at every stage end
    sample_every: int = 1000  # sample grid from the EMA model; 0 disables
    keep_last: int = 3  # checkpoints kept (the newest K)
    # jsonl (always) | tensorboard | wandb (see sprintdit.tracking)
    loggers: List[str] = field(default_factory=lambda: ["jsonl"])
    # steps with a non-finite loss or gradient norm skipped (no update) before the run stops as diverged
    max_nonfinite_steps: int = 0
    grid_rows: int = 10  # sample grid: one row per class (spread over the classes if there are more)
    grid_columns: int = 10  # samples per row (seeds 0, 1, ...)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # start from these weights (run/checkpoint folder or .safetensors, e.g. from `sprintdit sparsify`); model and
    # objective come from them
    init_from: Optional[str] = None
    # a frozen teacher (run/checkpoint folder or .safetensors, its EMA weights): the target moves towards its prediction
    distill_from: Optional[str] = None
    # with distill_from: 0 = the data's target only, 1 = the teacher's prediction only (see objective.Distill)
    distill_weight: float = 1.0


@dataclass
class EvalConfig:
    """What `sprintdit evaluate` and the in-training evaluation measure; samples use the `sample` section."""

    every: int = 0  # training: evaluate the EMA model every K steps (0: never)
    num_samples: int = 1000  # labels cycle through the classes; sample i uses seed seed_start + i
    seed_start: int = 0
    features: List[str] = field(default_factory=lambda: ["auto"])  # auto | fmnist | inception | dinov2
    # reference npz (ADM layout: images under arr_0 and/or statistics); default for fashion_mnist: its test split
    ref: Optional[str] = None
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (FID, sFID, IS, precision/recall)
    # tf: the TF graph's resize and scaling, as the ADM evaluator (its reference batches); pytorch-fid
    inception_resize: str = INCEPTION_TF
    dinov2_weights: Optional[str] = None  # dinov2_vitl14_pretrain.pth (FDD)
    dinov2_model: str = "ViT-L/14"  # the DINOv2 size the weights are for (FDD is defined with ViT-L/14)
    is_split_size: int = IS_SPLIT_SIZE  # Inception Score over consecutive splits of this many samples (0: one split)
    batch_size: int = 200  # images per feature-network forward


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass; list entries of dataclasses appear as `name.N.field`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        out.append(key)
        inner = [a for a in typing.get_args(hints[f.name]) if is_dataclass(a)]  # Optional[X] / List[X] of a dataclass X
        if is_dataclass(hints[f.name]):
            out += valid_keys(hints[f.name], key + ".")
        elif inner:
            out += valid_keys(inner[0], key + (".N." if typing.get_origin(hints[f.name]) is list else "."))
    return out


def explain(err: OmegaConfBaseException, source: str, root=None) -> UserError:
    """One line for an OmegaConf error in `source`, suggesting the closest valid key of `root` (default RunConfig)."""
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(err, "full_key", None) or "")
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key" in msg and "not" in msg:
        generic = ".".join("N" if part.isdigit() else part for part in key.split("."))
        close = difflib.get_close_matches(generic, valid_keys(root or RunConfig), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return UserError(f"unknown config key '{key}' in {source}{hint}")
    layout = f" ({LAYOUT})" if "incompatible container" in msg else ""
    return UserError(f"bad value for config key '{key}' in {source}: {msg}{layout}")


def find_shipped(name: str, folder: Path, what: str) -> Path:
    """A YAML path, or the name of one shipped in `folder` (with or without .yaml); `what` names it in the error."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = folder / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise UserError(f"{what} {name} not found (neither a file nor a shipped {what}: {', '.join(names) or 'none'})")


def find_config(name: str) -> Path:
    """A config path, or the name of a config shipped in sprintdit/configs/."""
    return find_shipped(name, CONFIG_DIR, "config")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file (a path, or the name of a shipped config such as "fashion_mnist_sprint") <- `a.b=value`
    overrides, type-checked, as a RunConfig, every rule checked (`validate`)."""
    run = compose_config(path, overrides)
    validate(run)
    return run


def compose_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """load_config without the rules between sections (each section's own fields are checked): for a caller that sets
    more fields on the typed config, then calls `validate` once."""
    base = OmegaConf.structured(RunConfig)
    layers = []
    if path is not None:
        path = find_config(str(path))
        try:
            parsed = read_yaml(Path(path).read_text(encoding="utf-8"))
            layer = OmegaConf.create(parsed) if isinstance(parsed, (dict, list)) else parsed
        except Exception as err:  # YAML syntax errors come in several types
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        layers.append((upgrade_moved_keys(mapping(layer, str(path)), str(path)), str(path)))
    cfg = base
    for layer, source in layers:
        cfg = merge(cfg, layer, source)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. train.batch_size=32)")
        key = moved_override_key(key)
        _check_list_indices(cfg, key)
        try:
            OmegaConf.update(cfg, key, read_yaml(text) if text else "", merge=True)
        except OmegaConfBaseException as err:
            raise explain(err, f"override {item!r}") from None
        except TypeError as err:  # OmegaConf: "Cannot merge incompatible container types"
            raise UserError(f"override {item!r} does not fit the config layout: {LAYOUT} ({err})") from None
        except (yaml.YAMLError, IndexError, ValueError) as err:
            raise UserError(f"override {item!r} cannot be applied: {str(err).splitlines()[0]}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise explain(err, "config") from None


def _check_list_indices(cfg, key: str) -> None:
    """Reject `stages.3.x` when there are fewer stages (OmegaConf would try to create the entry)."""
    node, path = cfg, []
    for part in key.split("."):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"config key '{key}': '{'.'.join(path)}' has {len(node)} entries (indices 0..{len(node) - 1})"
                )
            node = node[int(part)]
        elif OmegaConf.is_dict(node) and part in node:
            node = node[part]
        else:
            return  # unknown keys are reported by OmegaConf with a suggestion
        path.append(part)


def validate(cfg: RunConfig) -> None:
    """Every rule of a run config that needs neither data nor a checkpoint (those are in training/resolve.py): each
    section's own, then the rules between sections, each checked once."""
    validate_data(cfg)
    validate_train(cfg.train)
    validate_stages(cfg)
    validate_eval(cfg.eval)
    validate_across(cfg)


def validate_data(cfg: RunConfig) -> None:
    if cfg.data.name not in DATASETS:
        raise UserError(f"data.name is {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    if cfg.data.vae is not None and cfg.data.name != "latents":
        raise UserError(f"data.vae is for data.name latents, not {cfg.data.name}")
    if cfg.data.frames is not None and cfg.data.name not in VIDEO_DATASETS:
        raise UserError(f"data.frames is for video data ({', '.join(VIDEO_DATASETS)}), not {cfg.data.name}")
    if cfg.data.name in VIDEO_DATASETS and cfg.eval.every > 0:
        raise UserError(
            "eval.every scores images; video runs are scored by the video demo (sprintdit.moving.score_clips): set "
            "eval.every=0"
        )
    if cfg.data.num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.resolution < 1:
        raise UserError(f"data.resolution must be >= 1, got {cfg.data.resolution}")


def validate_train(t: TrainConfig) -> None:
    if t.precision not in PRECISIONS:
        raise UserError(f"train.precision is {t.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if t.compile_mode not in COMPILE_MODES:
        raise UserError(f"train.compile_mode is {t.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    counts = {
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "keep_last": t.keep_last,
        "log_every": t.log_every,
        "ckpt_every": t.ckpt_every,
        "grid_rows": t.grid_rows,
        "grid_columns": t.grid_columns,
    }
    for name, value in counts.items():
        if value < 1:
            raise UserError(f"train.{name} must be >= 1, got {value}")
    if t.sample_every < 0 or t.max_nonfinite_steps < 0:
        raise UserError("train.sample_every and train.max_nonfinite_steps must be >= 0")
    if any(n not in LOGGERS for n in t.loggers) or "jsonl" not in t.loggers:
        raise UserError(
            f"train.loggers is {list(t.loggers)}: choose from {', '.join(LOGGERS)}; jsonl is always one of them "
            f"(resume reads it)"
        )
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")


def validate_stages(cfg: RunConfig) -> None:
    t = cfg.train
    if not cfg.stages:
        raise UserError("the config needs at least one entry under 'stages'")
    for i, s in enumerate(cfg.stages):
        batch = s.batch_size or t.batch_size
        if (
            s.steps < 1
            or not 0 < s.lr < math.inf
            or s.warmup_steps < 0
            or (s.batch_size is not None and s.batch_size < 1)
        ):
            raise UserError(
                f"stages.{i} ({s.name}): steps must be >= 1, lr finite and > 0, warmup_steps >= 0, batch_size >= 1 (or "
                f"unset)"
            )
        if batch % t.grad_accum:
            raise UserError(
                f"stages.{i} ({s.name}): batch size {batch} is not divisible by train.grad_accum {t.grad_accum}"
            )
        if s.decay not in LR_DECAYS:
            raise UserError(f"stages.{i}.decay is {s.decay!r}; choose one of {', '.join(LR_DECAYS)}")
        if s.mask_type not in MASK_TYPES:
            raise UserError(f"stages.{i}.mask_type is {s.mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise UserError(f"stage names must be unique, got {names}")


def check_sample_section(cfg: RunConfig) -> None:
    """The sample section against the model and objective it samples."""
    try:
        check_sampling(cfg.model, cfg.objective.kind, cfg.sample)
    except UserError as err:
        raise UserError(f"sample: {err}") from None


def validate_across(cfg: RunConfig) -> None:
    """The rules between sections (model, objective, sample, eval, train). With train.init_from the model and
    objective are that checkpoint's: the sample section is checked once they are known (apply_init_from)."""
    t = cfg.train
    if t.init_from is None:
        check_sample_section(cfg)
    if cfg.model.condition == "text" and cfg.eval.every:
        raise UserError(
            "eval.every: in-training evaluation scores class-conditional samples; a text model is scored by its demo "
            "(sprintdit.layouts)"
        )
    if not 0.0 <= t.distill_weight <= 1.0:
        raise UserError(f"train.distill_weight must be in [0, 1], got {t.distill_weight}")
    if t.sparse_gating and (cfg.model.arch != "sparsedit" or cfg.objective.kind != "flow"):
        raise UserError("train.sparse_gating is for SparseDiT (model.arch sparsedit) trained with objective.kind flow")


def reference_root(data: DataConfig) -> str | None:
    """The Fashion-MNIST folder whose test split is the default FID reference of a run on it (None for other data)."""
    return data.root if data.name == "fashion_mnist" else None


def validate_eval(e: EvalConfig) -> None:
    if e.every < 0 or e.num_samples < 2 or e.batch_size < 1 or e.is_split_size < 0:
        raise UserError(
            "eval.every must be >= 0, eval.num_samples >= 2 (a covariance needs two samples), eval.batch_size >= 1, "
            "eval.is_split_size >= 0 (0: one split)"
        )
    if not e.features or any(f not in FEATURE_NETWORKS for f in e.features):
        raise UserError(f"eval.features is {list(e.features)}; choose from {', '.join(FEATURE_NETWORKS)}")
    if e.inception_resize not in INCEPTION_RESIZES:
        raise UserError(
            f"eval.inception_resize is {e.inception_resize!r}; choose one of {', '.join(INCEPTION_RESIZES)}"
        )


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


LAYOUT = "stages is a list of stages, every other section a mapping of keys"


def merge(cfg, layer, source: str):
    """OmegaConf.merge with its errors (unknown keys, wrong types, a list where a mapping belongs) as one line."""
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as err:
        raise explain(err, source) from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{source} does not fit the config layout: {LAYOUT} ({err})") from None


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 integers, which YAML 1.2 dropped: `6:10` (a grid schedule)
    stays the string '6:10' instead of becoming 370."""


INT_TAG = "tag:yaml.org,2002:int"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def read_yaml(text: str):
    """A YAML document as Python values, the way every config, override and study file is read (ConfigLoader)."""
    return yaml.load(text, Loader=ConfigLoader)


def mapping(node, source: str):
    """A parsed YAML document that must be a mapping of sections (an empty file is an empty one)."""
    if node is None:
        return OmegaConf.create({})
    if not OmegaConf.is_dict(node):
        kind = "list" if OmegaConf.is_list(node) else type(node).__name__
        raise UserError(f"{source} must be a mapping of config sections (model:, train:, stages: ...), not a {kind}")
    return node


def from_yaml_text(text: str, source: str) -> RunConfig:
    """A RunConfig from saved YAML (a run's config.yaml or a checkpoint's metadata)."""
    try:
        parsed = read_yaml(text)
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from None
    node = upgrade_moved_keys(
        mapping(OmegaConf.create(parsed) if isinstance(parsed, (dict, list)) else parsed, source), source
    )
    try:
        run = OmegaConf.to_object(merge(OmegaConf.structured(RunConfig), node, source))
    except OmegaConfBaseException as err:
        raise explain(err, source) from None
    validate(run)
    return run


def moved_warning(source: str, old: list[str]) -> None:
    new = [MOVED_MODEL_KEYS[k] for k in old]
    warn(
        f"{source}: model.{', model.'.join(old)} {'is' if len(old) == 1 else 'are'} now model.{', model.'.join(new)} "
        f"(the old keys are read until sprintdit 0.3)"
    )


def upgrade_moved_keys(node, source: str):
    """A parsed config with the flat model keys of sprintdit 0.1 moved into their sections (`model.sprint`,
    `model.repa`)."""
    model = node.get("model")
    if not OmegaConf.is_dict(model):
        return node
    old = [k for k in MOVED_MODEL_KEYS if k in model]
    for key in old:
        section, name = MOVED_MODEL_KEYS[key].split(".")
        if model.get(section) is None:
            model[section] = {}
        if name in model[section]:
            raise UserError(f"{source} sets both model.{key} and model.{section}.{name}; keep model.{section}.{name}")
        model[section][name] = model.pop(key)
    if old:
        moved_warning(source, old)
    return node


def moved_override_key(key: str) -> str:
    """`model.fusion` -> `model.sprint.fusion` (with a warning) for the flat keys of sprintdit 0.1; other keys as
    given."""
    section, _, name = key.partition(".")
    if section != "model" or name not in MOVED_MODEL_KEYS:
        return key
    moved_warning(f"override {key}", [name])
    return f"model.{MOVED_MODEL_KEYS[name]}"
