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

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .checkpoint import load_model
from .config import RunConfig
from .distributed import Dist, pick_device
from .errors import UserError
from .images import to_uint8
from .models import ModelConfig
from .sampling_run import SamplingRun
from .text_encoders import encode_prompts
from .training import Trainer


def train(cfg: RunConfig, out: str | Path, stop_at: int | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run `cfg` in the folder `out`; returns its latest checkpoint folder. A stop signal
    raises sprintdit.errors.Stopped after saving (re-run to resume); divergence raises Diverged."""
    return Trainer(cfg, out, progress=progress).fit(stop_at=stop_at)


MAX_SAMPLES = 100_000  # samples one `sample` call holds in memory at most (ADM's evaluation batches hold 50,000)


def sample_conditions(
    model: ModelConfig,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    per_label: int = 1,
    text_encoder_path: str | None = None,
    device: str | torch.device = "cpu",
    network: torch.nn.Module | None = None,
) -> list:
    """One condition per sample, each label or prompt `per_label` times in a row: class labels (default: every
    class) for a class model; for a text model its prompts as token ids or embeddings (text_encoders.encode_prompts,
    which fills `network`'s unconditional caption where it is unset)."""
    if per_label < 1:
        raise UserError(f"per_label (--per-label) must be >= 1, got {per_label}")
    count = per_label * len(
        prompts if model.condition == "text" and prompts else labels if labels is not None else range(model.num_classes)
    )
    if count > MAX_SAMPLES:
        raise UserError(
            f"{count} samples asked for; one call draws at most {MAX_SAMPLES} (they are held in memory): split the job "
            f"by --seeds or labels"
        )
    if model.condition == "text":
        if not prompts or labels is not None:
            raise UserError("this model is text-conditioned: give prompts (--prompt TEXT, --prompts FILE), not labels")
        return list(
            encode_prompts(
                model, [p for p in prompts for _ in range(per_label)], text_encoder_path, device, network
            ).cpu()
        )
    if prompts:
        raise UserError("this model is class-conditional: give labels, not prompts")
    return [int(y) for y in (range(model.num_classes) if labels is None else labels) for _ in range(per_label)]


class Pipeline:
    """Sampling from a checkpoint: class labels (or, for a text model, prompts) and per-sample seeds in, PIL images out.

    The network, objective (flow matching or DDPM, and so the null class for guidance) and default sampling
    settings come from the checkpoint; latent models decode with the run's VAE and every image is clamped to
    [-1, 1] and rounded to uint8 as the ADM sample scripts do. An image depends only on its label and seed."""

    def __init__(
        self, model: torch.nn.Module, run: RunConfig, device: torch.device, text_encoder_path: str | None = None
    ):
        # one process: the pipeline samples on its own device
        self.handle = SamplingRun.of(model, run, Dist(device=device))
        self.text_encoder_path = text_encoder_path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "auto", use_ema: bool = True, text_encoder_path: str | None = None
    ) -> "Pipeline":
        """A run folder (its latest checkpoint), a checkpoint folder, an exported folder or a .safetensors file."""
        model, run = load_model(path, use_ema=use_ema)
        return cls(model, run, pick_device(device), text_encoder_path)

    def to(self, device: str | torch.device) -> "Pipeline":
        device = pick_device(device) if isinstance(device, str) else torch.device(device)
        self.handle = SamplingRun.of(self.handle.model, self.handle.config, Dist(device=device))
        return self

    @property
    def model(self) -> torch.nn.Module:
        return self.handle.model

    @property
    def run(self) -> RunConfig:
        return self.handle.config

    @property
    def device(self) -> torch.device:
        return self.handle.device

    @property
    def num_classes(self) -> int:
        return self.run.model.num_classes

    def __call__(
        self,
        labels: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance: str | None = None,
        scale: float | None = None,
        sampler: str | None = None,
        interval: Sequence[float] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        prompts: Sequence[str] | None = None,
        middle_keep: str | float | None = None,
        middle_mask: str | None = None,
        middle_interval: Sequence[float] | None = None,
    ) -> list[Image.Image]:
        """One image per label or prompt (seed: its position when `seeds` is not given); unset settings: the run's
        `sample`. middle_keep (SPRINT): the share of the tokens the middle blocks see per step, e.g. 0.25 or "0.25:1"
        (sprintdit.density)."""
        if labels is None and prompts is None:
            raise UserError("give labels (a class model) or prompts (a text model)")
        labels = sample_conditions(self.run.model, labels, prompts, 1, self.text_encoder_path, self.device, self.model)
        cfg = self.handle.sample_config(
            steps=steps,
            guidance=guidance,
            scale=scale,
            sampler=sampler,
            batch_size=batch_size,
            interval=None if interval is None else [float(v) for v in interval],
            middle_keep=None if middle_keep is None else str(middle_keep),
            middle_mask=middle_mask,
            middle_interval=None if middle_interval is None else [float(v) for v in middle_interval],
        )
        seeds = list(range(len(labels))) if seeds is None else list(seeds)
        pixels = to_uint8(self.handle.generate(list(labels), seeds, cfg, progress=progress)[0])  # (N, H, W, C) uint8
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
