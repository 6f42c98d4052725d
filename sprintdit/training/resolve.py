"""The config rules that depend on data and checkpoints, in one place: the model's data-dependent fields (input size,
channels, classes, caption encoder, REPA width) filled from the dataset and checked against it, every stage's mask
and clip length checked against the model, `train.init_from`'s model and objective, and `train.distill_from`'s
teacher. `resolve_run` is what the trainer and the studies call."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import checkpoint as ckpt
from ..config import RunConfig, check_sample_section
from ..errors import UserError
from ..masking import check_mask_ratio
from ..models import ModelConfig, resolve_model_config
from ..objective import Distill, ObjectiveConfig
from ..sections import TextConfig

TEACHER_MUST_MATCH = {
    "model": ("input_size", "in_channels", "num_classes", "condition", "text"),
    "objective": ("kind", "path", "num_timesteps", "beta_start", "beta_end"),
}


def resolve_run(cfg: RunConfig, dataset) -> RunConfig:
    """The config a run trains with: train.init_from's model and objective, then the data-dependent fields filled and
    every cross-field rule that needs the data checked (see resolve_run_config)."""
    return resolve_run_config(apply_init_from(cfg), dataset)


def resolve_run_config(cfg: RunConfig, dataset) -> RunConfig:
    """Fill the model's data-dependent fields (and a latent run's VAE) from the dataset and check them and every stage's
    mask."""
    m, data = cfg.model, cfg.data
    if data.name == "latents" and data.vae is None:
        data = replace(data, vae=dataset.vae_path)
    from_data = {
        "input_size": list(dataset.resolution),
        "in_channels": dataset.channels,
        "num_classes": dataset.num_classes,
    }
    features = getattr(dataset, "feature_shape", None)  # (T, D) REPA targets stored with the data
    if m.repa.depth:
        if features is None:
            raise UserError(
                "model.repa.depth needs DINOv2 features stored with the data: run `sprintdit prepare` with "
                "--dinov2-weights, train on data.name=latents"
            )
        if m.repa.dim is not None and m.repa.dim != features[1]:
            raise UserError(
                f"model.repa.dim is {m.repa.dim} but the data's features have {features[1]}; leave it unset to follow "
                f"the data"
            )
        m = replace(m, repa=replace(m.repa, dim=features[1]))
    m = text_from_data(m, dataset)
    check_data_shape(m, from_data, cfg.train.init_from)
    m = resolve_model_config(replace(m, **{k: v for k, v in from_data.items() if getattr(m, k) is None}))
    if m.repa.depth and features[0] != m.num_tokens:
        raise UserError(
            f"the stored DINOv2 features have {features[0]} tokens but the model's token grid is "
            f"{m.grid[0]}x{m.grid[1]}; prepare with --patch-size {m.patch_size}"
        )
    for i, stage in enumerate(cfg.stages):
        if m.arch == "sparsedit" and stage.mask_ratio > 0:
            raise UserError(
                f"stages.{i} ({stage.name}): SparseDiT picks its tokens itself (model.sparse.grid); set mask_ratio 0"
            )
        if stage.frames is not None and not (
            m.video
            and m.arch == "sit"
            and not m.repa.depth
            and 1 <= stage.frames <= m.input_size[0]
            and stage.frames % m.patch_size_t == 0
        ):
            raise UserError(
                f"stages.{i} ({stage.name}): frames {stage.frames} trains a SiT video model (no REPA) on shorter "
                f"clips: it needs a multiple of "
                f"model.patch_size_t ({m.patch_size_t}) up to the clip's "
                f"{m.input_size[0] if m.video else 'frames (this is an image model)'}"
            )
        try:
            check_mask_ratio(stage.mask_ratio, stage.mask_type, m.at_frames(stage.frames).mask_grid()[0])
        except UserError as err:
            raise UserError(f"stages.{i} ({stage.name}): {err}") from None
    return replace(cfg, model=m, data=data)


def text_from_data(m: ModelConfig, dataset) -> ModelConfig:
    """model.text from captioned data (checked when given): the learned encoder's vocabulary and length, or a
    prepared table's encoder, folder, width and length. Class data needs condition class, and captions text."""
    vocabulary, table = getattr(dataset, "vocabulary", None), getattr(dataset, "caption_table", None)
    captioned = vocabulary is not None or table is not None
    if captioned != (m.condition == "text"):
        kind = "captions" if captioned else "class labels"
        raise UserError(
            f"the data has {kind} but model.condition is {m.condition!r}; set "
            f"model.condition={'text' if captioned else 'class'}"
        )
    if not captioned:
        return m
    tx = m.text
    if table is not None:
        if tx.encoder != table.encoder:
            raise UserError(
                f"the data holds {table.encoder} caption embeddings ({table.folder}); set "
                f"model.text.encoder={table.encoder}"
            )
        if tx.dim not in (None, table.dim):
            raise UserError(
                f"model.text.dim is {tx.dim} but the data's embeddings have {table.dim}; leave it unset to follow the "
                f"data"
            )
        return replace(m, text=replace(tx, dim=table.dim, max_tokens=table.max_tokens, path=tx.path or table.path))
    if tx.encoder != "learned":
        raise UserError(
            f"model.text.encoder {tx.encoder} reads embeddings prepared by `sprintdit prepare --captions`; this data "
            f"has raw captions (use encoder learned)"
        )
    if tx.vocabulary is not None and list(tx.vocabulary) != list(vocabulary):
        raise UserError(
            f"model.text.vocabulary differs from the data's {len(vocabulary)} words; leave it unset to follow the data"
        )
    return replace(m, text=replace(tx, vocabulary=list(vocabulary), max_tokens=dataset.max_tokens))


def check_data_shape(m: ModelConfig, from_data: dict, init_from: str | None) -> None:
    """The model's set input fields against the data's (unset ones follow the data)."""
    hint = (
        f"the model of train.init_from {init_from} takes data of its own shape"
        if init_from
        else "leave it unset to follow the data"
    )
    for key, value in from_data.items():
        given = getattr(m, key)
        if given is not None and (list(given) if key == "input_size" else given) != value:
            raise UserError(f"model.{key} is {given} but the data has {value}; {hint}")


def apply_init_from(cfg: RunConfig) -> RunConfig:
    """With train.init_from: the config with that checkpoint's model and objective."""
    if cfg.train.init_from is None:
        return cfg
    if cfg.model != ModelConfig() or cfg.objective != ObjectiveConfig():
        raise UserError(
            "model and objective come from train.init_from: remove the model and objective sections (and overrides)"
        )
    _, source = ckpt.load_weights(ckpt.resolve_weights(cfg.train.init_from, use_ema=True))
    out = replace(cfg, model=source.model, objective=source.objective)
    check_sample_section(out)
    return out


def teacher_view(value):
    """What a teacher must share with its student: a text config but for the folder its encoder lives in."""
    return replace(value, path=None) if isinstance(value, TextConfig) else value


def load_teacher(cfg: RunConfig, device: torch.device) -> Distill | None:
    """train.distill_from's EMA network, frozen on `device`, when it sees the same inputs and predicts the same target
    as the run's model."""
    t = cfg.train
    if t.distill_from is None:
        return None
    teacher, source = ckpt.load_model(t.distill_from, use_ema=True, device=device)
    for section, keys in TEACHER_MUST_MATCH.items():
        for key in keys:
            mine, theirs = (teacher_view(getattr(getattr(c, section), key)) for c in (cfg, source))
            if mine != theirs:
                raise UserError(
                    f"train.distill_from {t.distill_from}: the teacher's {section}.{key} is {theirs}, this run's "
                    f"{mine}; a teacher must see the same data and predict the same target"
                )
    return Distill(teacher.requires_grad_(False), t.distill_weight)
