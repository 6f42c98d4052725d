"""The Python API: `sprintdit.load_config`, `sprintdit.train` and `sprintdit.Pipeline` (the CLI is a thin layer over
the same library functions).

    import sprintdit
    cfg = sprintdit.load_config("fashion_mnist_sprint", ["stages.0.steps=100"])
    sprintdit.train(cfg, out="runs/fm")
    pipe = sprintdit.Pipeline.from_pretrained("runs/fm", device="cpu")
    images = pipe(labels=[0, 1, 2], seeds=[0, 1, 2], steps=25, guidance="pdg", scale=2.0)  # PIL images
    images = text_pipe(prompts=["a bag top left"], seeds=[0])  # a text-conditioned run (model.condition text)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .checkpoint import load_model
from .config import RunConfig
from .distributed import Dist, init_from_env, pick_device
from .errors import UserError
from .images import to_uint8
from .models import ModelConfig
from .models.sit import null_condition
from .objective import DDPM, FlowMatching, build_objective
from .sampling import SampleConfig, generate, generate_on_ranks
from .text_encoders import encode_prompts
from .trainer import Trainer
from .vae import pixel_decoder


def train(cfg: RunConfig, out: str | Path, stop_at: int | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run `cfg` in the folder `out`; returns its latest checkpoint folder. A stop signal
    raises sprintdit.errors.Stopped after saving (re-run to resume); divergence raises Diverged."""
    return Trainer(cfg, out, progress=progress).fit(stop_at=stop_at)


MAX_SAMPLES = 100_000  # samples one `sample` call holds in memory at most (ADM's evaluation batches hold 50,000)


def sample_conditions(model: ModelConfig, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, per_label: int = 1,
                      text_encoder_path: str | None = None, device: str | torch.device = "cpu") -> list:
    """One condition per sample, each label or prompt `per_label` times in a row: class labels (default: every
    class) for a class model; for a text model its prompts as token ids or embeddings (text_encoders.encode_prompts)."""
    if per_label < 1:
        raise UserError(f"per_label (--per-label) must be >= 1, got {per_label}")
    count = per_label * len(prompts if model.condition == "text" and prompts else labels if labels is not None else range(model.num_classes))
    if count > MAX_SAMPLES:
        raise UserError(f"{count} samples asked for; one call draws at most {MAX_SAMPLES} (they are held in memory): split the job by --seeds or labels")
    if model.condition == "text":
        if not prompts or labels is not None:
            raise UserError("this model is text-conditioned: give prompts (--prompt TEXT, --prompts FILE), not labels")
        return list(encode_prompts(model, [p for p in prompts for _ in range(per_label)], text_encoder_path, device).cpu())
    if prompts:
        raise UserError("this model is class-conditional: give labels, not prompts")
    return [int(y) for y in (range(model.num_classes) if labels is None else labels) for _ in range(per_label)]


@dataclass
class SamplingRun:
    """A checkpoint opened for sampling on this process's rank: under torchrun its process group (with the run's
    distributed.timeout_s), otherwise one process. What `sprintdit sample` and `evaluate --checkpoint` share."""

    model: torch.nn.Module  # on this rank's device
    config: RunConfig  # the run's resolved config, read from the checkpoint
    dist: Dist
    objective: FlowMatching | DDPM  # the run's (so the null condition for guidance)
    to_pixels: Callable[[torch.Tensor], torch.Tensor]  # samples -> pixels in [-1, 1] (latents: the run's VAE)

    @classmethod
    def open(cls, checkpoint: str | Path, use_ema: bool = True, device: str = "auto", sparse_grid: str | None = None) -> "SamplingRun":
        """sparse_grid: sample a SparseDiT with this density schedule instead of its own (e.g. "8" or "6:10")."""
        model, run = load_model(checkpoint, use_ema=use_ema)
        if sparse_grid is not None:
            if run.model.arch != "sparsedit":
                raise UserError(f"a sparse grid applies to SparseDiT checkpoints; {checkpoint} holds a {run.model.arch} model")
            model.use_grid(sparse_grid)
            run.model.sparse.grid = sparse_grid  # the run's config describes the network that samples
        d = init_from_env(run.distributed, pick_device(device))
        objective = build_objective(run.objective, null_condition(run.model), run.model.learn_sigma)
        return cls(model.to(d.device), run, d, objective, pixel_decoder(run.data, d.device))

    def sample_config(self, **given) -> SampleConfig:
        """The run's `sample` section with the `given` settings (None: unset) on top, validated."""
        return SampleConfig(**{**vars(self.config.sample), **{k: v for k, v in given.items() if v is not None}})

    def generate(self, conditions: list, seeds: list[int], cfg: SampleConfig, progress: bool = False) -> tuple[torch.Tensor | None, float]:
        """(pixels (N, C, H, W) in [-1, 1], seconds) on rank 0, (None, seconds) on the others: the samples are spread
        over the ranks and gathered on rank 0, which decodes them."""
        tic = time.perf_counter()
        samples = generate_on_ranks(self.model, self.objective, conditions, seeds, cfg, self.dist, progress=progress)
        images = self.to_pixels(samples) if self.dist.is_main else None
        return images, time.perf_counter() - tic


class Pipeline:
    """Sampling from a checkpoint: class labels (or, for a text model, prompts) and per-sample seeds in, PIL images out.

    The network, objective (flow matching or DDPM, and so the null class for guidance) and default sampling
    settings come from the checkpoint; latent models decode with the run's VAE and every image is clamped to
    [-1, 1] and rounded to uint8 as the ADM sample scripts do. An image depends only on its label and seed."""

    def __init__(self, model: torch.nn.Module, run: RunConfig, device: torch.device, text_encoder_path: str | None = None):
        self.model = model.eval()
        self.run = run
        self.objective = build_objective(run.objective, null_condition(run.model), run.model.learn_sigma)
        self.text_encoder_path = text_encoder_path
        self.device = device
        self.to_pixels = pixel_decoder(run.data, device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", use_ema: bool = True, text_encoder_path: str | None = None) -> "Pipeline":
        """A run folder (its latest checkpoint), a checkpoint folder, an exported folder or a .safetensors file."""
        target = pick_device(device)
        model, run = load_model(path, use_ema=use_ema, device=target)
        return cls(model, run, target, text_encoder_path)

    def to(self, device: str | torch.device) -> "Pipeline":
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        self.model.to(self.device)
        self.to_pixels = pixel_decoder(self.run.data, self.device)
        return self

    @property
    def num_classes(self) -> int:
        return self.run.model.num_classes

    def __call__(
        self, labels: Sequence[int] | None = None, seeds: Sequence[int] | None = None, steps: int | None = None, guidance: str | None = None,
        scale: float | None = None, sampler: str | None = None, interval: Sequence[float] | None = None, batch_size: int | None = None,
        progress: bool = False, prompts: Sequence[str] | None = None,
    ) -> list[Image.Image]:
        """One image per label or prompt (seed: its position when `seeds` is not given); unset settings: the run's `sample`."""
        if labels is None and prompts is None:
            raise UserError("give labels (a class model) or prompts (a text model)")
        labels = sample_conditions(self.run.model, labels, prompts, 1, self.text_encoder_path, self.device)
        given = {"steps": steps, "guidance": guidance, "scale": scale, "sampler": sampler, "batch_size": batch_size,
                 "interval": None if interval is None else [float(v) for v in interval]}
        cfg = replace(self.run.sample, **{k: v for k, v in given.items() if v is not None})
        cfg = SampleConfig(**vars(cfg))  # validated
        seeds = list(range(len(labels))) if seeds is None else list(seeds)
        samples = generate(self.model, self.objective, list(labels), seeds, cfg, self.device, progress=progress)  # (N, C, H, W)
        pixels = to_uint8(self.to_pixels(samples))  # (N, H, W, C) uint8
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
