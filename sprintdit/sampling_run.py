"""The one sampling handle: a network with everything that samples and scores it (its run config, objective, pixel
decoder, process group and, once built, the evaluator's feature networks and reference). Opened from a checkpoint
(`SamplingRun.open`: `sample`, `evaluate`, `Pipeline`) or taken from a trainer's EMA (`Trainer.sampling_run()`:
periodic grids and evaluation, the demos, the studies)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_model
from .config import RunConfig, reference_root
from .distributed import Dist, init_from_env, pick_device
from .errors import UserError
from .models.sit import null_condition
from .objective import DDPM, FlowMatching, build_objective
from .sampling import SampleConfig, generate_on_ranks
from .vae import NO_VAE, pixel_decoder


@dataclass
class SamplingRun:
    """A network opened for sampling on this process's rank: under torchrun its process group (the samples are spread
    over the ranks and gathered on rank 0), otherwise one process."""

    model: torch.nn.Module  # in eval mode, on this rank's device
    config: RunConfig  # the run's resolved config
    dist: Dist
    objective: FlowMatching | DDPM  # the run's (so the null condition for guidance)
    to_pixels: Callable[[torch.Tensor], torch.Tensor]  # samples -> pixels in [-1, 1] (latents: the run's VAE)
    evaluator: object | None = None  # sprintdit.evaluate.Evaluator, built at the first `score` and kept for the next

    @classmethod
    def open(
        cls,
        checkpoint: str | Path,
        use_ema: bool = True,
        device: str = "auto",
        sparse_grid: str | None = None,
        vae: str | None = None,
    ) -> "SamplingRun":
        """A run folder (its latest checkpoint), a checkpoint folder or a .safetensors file; under torchrun, this rank's
        share. sparse_grid: sample a SparseDiT with this density schedule instead of its own (e.g. "8" or "6:10").
        vae: a latent run's decoder folder instead of its data.vae (a converted release names none)."""
        model, run = load_model(checkpoint, use_ema=use_ema)
        if vae is not None:
            if run.data.name != "latents":
                raise UserError(f"--vae decodes latent runs; {checkpoint} samples {run.data.name} pixels")
            run.data.vae = vae
        if run.data.name == "latents" and run.data.vae is None:  # refused before sampling, not after
            raise UserError(NO_VAE)
        if sparse_grid is not None:
            if run.model.arch != "sparsedit":
                raise UserError(
                    f"a sparse grid applies to SparseDiT checkpoints; {checkpoint} holds a {run.model.arch} model"
                )
            model.use_grid(sparse_grid)
            run.model.sparse.grid = sparse_grid  # the run's config describes the network that samples
        return cls.of(model, run, init_from_env(run.distributed, pick_device(device)))

    @classmethod
    def of(cls, model: torch.nn.Module, run: RunConfig, d: Dist) -> "SamplingRun":
        """The handle of `model`, a network of the run `run`, moved to d.device (its objective and decoder built)."""
        objective = build_objective(run.objective, null_condition(run.model), run.model.learn_sigma)
        return cls(model.to(d.device).eval(), run, d, objective, pixel_decoder(run.data, d.device))

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def sample_config(self, **given) -> SampleConfig:
        """The run's `sample` section with the `given` settings (None: unset) on top, validated."""
        return SampleConfig(**{**vars(self.config.sample), **{k: v for k, v in given.items() if v is not None}})

    def generate(
        self, conditions: list, seeds: list[int], cfg: SampleConfig | None = None, progress: bool = False
    ) -> tuple[torch.Tensor | None, float]:
        """(pixels (N, C, H, W) in [-1, 1], seconds) on rank 0, (None, seconds) on the others: one sample per condition
        (class label, or caption token ids / embeddings) and seed, spread over the ranks and decoded on rank 0.
        `cfg` None: the run's sampling settings."""
        tic = time.perf_counter()
        samples = generate_on_ranks(
            self.model, self.objective, conditions, seeds, cfg or self.config.sample, self.dist, progress=progress
        )
        images = self.to_pixels(samples) if self.dist.is_main else None
        return images, time.perf_counter() - tic

    def score(self, cfg=None, scfg: SampleConfig | None = None, data_root: str | None = None, progress: bool = False):
        """Generate cfg.num_samples images (`cfg`: an EvalConfig, default the run's eval section; `scfg`: sampling
        settings, default the run's; labels cycle through the classes, sample i has seed seed_start + i) and score them
        on rank 0 against the reference (`data_root`: the Fashion-MNIST folder of the default one, default the run's
        data). Returns sprintdit.evaluate.Scored on rank 0, None on the others."""
        from .evaluate import Evaluator, Scored, eval_labels_and_seeds, sampling_setting, to_uint8_nchw

        cfg = cfg or self.config.eval
        mc = self.model.config
        if mc.condition != "class":
            raise UserError(
                "evaluate scores class-conditional models; a text model needs captions to sample from (the text demo "
                "scores its own: sprintdit demo --config fashion_mnist_text)"
            )
        if mc.video:
            raise UserError(
                "evaluate scores images; a video model's clips are scored frame by frame by the video demo (sprintdit "
                "demo --config fashion_mnist_video, sprintdit.moving.score_clips)"
            )
        labels, seeds = eval_labels_and_seeds(cfg, mc.num_classes)
        pixels, seconds = self.generate(labels, seeds, scfg, progress)
        if pixels is None:
            return None
        images = to_uint8_nchw(pixels)
        self.evaluator = self.evaluator or Evaluator(
            cfg, tuple(images.shape[1:]), self.device, data_root or reference_root(self.config.data)
        )
        results = self.evaluator(images, torch.tensor(labels))
        scfg = scfg or self.config.sample
        results["provenance"]["setting"] = sampling_setting(scfg, self.sampling_nfe(scfg), seeds)
        return Scored(results, images, labels, seconds, self.evaluator)

    def sampling_gflops(self, scfg: SampleConfig | None = None) -> float:
        """Model GFLOP per sample with the sampling settings `scfg` (default the run's)."""
        from .flops import GIGA, sampling_flops

        return sampling_flops(self.model, self.objective, scfg or self.config.sample) / GIGA

    def sampling_nfe(self, scfg: SampleConfig | None = None) -> int | None:
        """Network evaluations per sample with the sampling settings `scfg` (default the run's); None if adaptive."""
        from .flops import sampling_nfe

        return sampling_nfe(self.model, self.objective, scfg or self.config.sample)
