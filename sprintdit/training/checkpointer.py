"""The training state on disk: what a checkpoint holds beyond the weights (`TrainState`: step, data position,
skipped steps, seconds; optimizer, loss scaler and RNG), written by rank 0 once every rank's shards are gathered
(FSDP2) and read back by every rank into its own wrapping, on any world size or strategy."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..distributed import Dist, barrier, collective, optimizer_state_by_index, optimizer_state_by_name
from .networks import Networks, full_state_options
from .runfolder import RunFolder
from .schedules import stage_at, stage_batch


@dataclass
class TrainState:
    """Where a run stands: what it needs, besides the networks and the optimizer, to continue exactly."""

    step: int = 0  # optimizer steps done (global)
    position: int = 0  # samples of the data order consumed
    # steps skipped for a non-finite loss or gradient norm (train.max_nonfinite_steps)
    nonfinite_steps: list[int] = field(default_factory=list)
    # wall-clock of the training steps so far (evaluation and sample grids excluded), kept across resumes
    train_seconds: float = 0.0


class Checkpointer:
    """Saves and loads the checkpoints of one run folder for one training process."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, nets: Networks, d: Dist, config_yaml: str):
        self.cfg, self.folder, self.nets, self.dist, self.config_yaml = cfg, folder, nets, d, config_yaml

    @property
    def strategy(self) -> str:
        return self.cfg.distributed.strategy

    def open_run(self) -> TrainState:
        """Take the run folder (rank 0: its lock, config.yaml, leftovers of killed writes) and resume its latest
        checkpoint; the lock is released again if anything fails."""
        try:
            if self.dist.is_main:
                self.folder.take(self.cfg)
            latest = self.folder.checkpoints()
            state = self.load(latest[-1]) if latest else TrainState()
            if self.dist.is_main:
                self.folder.trim(state.step)
        except BaseException:
            self.folder.release()
            raise
        return state

    def full_states(self, step: int) -> tuple[dict, dict, dict]:
        """(model, EMA, optimizer) states, full and on the CPU of rank 0 (FSDP: gathered from every rank's shards;
        other ranks get empty dicts). The optimizer state is index-keyed as torch's own, for any strategy."""
        n = self.nets
        if not n.fsdp:
            return n.model.state_dict(), n.ema.state_dict(), n.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = full_state_options(cpu_offload=True)
        with collective(self.dist, f"gathering the sharded state of checkpoint step {step}"):
            model, ema = get_model_state_dict(n.model, options=opts), get_model_state_dict(n.ema, options=opts)
            optim = get_optimizer_state_dict(n.model, n.optimizer, options=opts)
        return model, ema, optimizer_state_by_index(optim, n.param_names) if self.dist.is_main else {}

    def save(self, state: TrainState) -> Path:
        """Rank 0 writes the checkpoint (atomically) once every rank's part is gathered; the others wait."""
        model, ema, optim = self.full_states(state.step)
        if self.dist.is_main:
            saved = {
                "step": state.step,
                "position": state.position,
                "nonfinite_steps": state.nonfinite_steps,
                "train_seconds": state.train_seconds,
                "world_size": self.dist.world_size,
                "strategy": self.strategy,
                "optimizer": optim,
                "scaler": self.nets.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            ckpt.save_checkpoint(
                self.folder.path, state.step, model, ema, saved, self.config_yaml, self.cfg.train.keep_last
            )
        barrier(self.dist, f"waiting for rank 0 to write checkpoint step {state.step}")
        return ckpt.step_dir(self.folder.path, state.step)

    def load(self, folder: Path) -> TrainState:
        """Every rank reads the full checkpoint (any world size, any strategy) and keeps what it holds."""
        n = self.nets
        weights = [ckpt.load_weights(folder / name)[0] for name in ckpt.FILES[:2]]
        saved = ckpt.load_train_state(folder / ckpt.FILES[2])
        ckpt.check_step(folder, int(folder.name.removeprefix("step_")), saved["step"], "its training state records")
        if n.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            opts = full_state_options(cpu_offload=False)
            with collective(self.dist, f"loading checkpoint {folder.name} into the shards"):
                set_model_state_dict(n.model, weights[0], options=opts)
                set_model_state_dict(n.ema, weights[1], options=opts)
                named = optimizer_state_by_name(saved["optimizer"], n.param_names)
                set_optimizer_state_dict(n.model, n.optimizer, named, options=opts)
        else:
            ckpt.load_state(n.model, weights[0], folder / ckpt.FILES[0])
            ckpt.load_state(n.ema, weights[1], folder / ckpt.FILES[1])
            n.optimizer.load_state_dict(saved["optimizer"])
        n.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        state = TrainState(
            saved["step"], saved["position"], list(saved.get("nonfinite_steps", [])), saved.get("train_seconds", 0.0)
        )  # absent in checkpoints written before it was kept
        world = (saved.get("world_size", 1), saved.get("strategy", "ddp"))
        if world != (self.dist.world_size, self.strategy) and self.dist.is_main:
            print(self.world_change_note(state.step, *world), file=sys.stderr)
        return state

    def world_change_note(self, step: int, world: int, strategy: str) -> str:
        accum = self.cfg.train.grad_accum
        batch = stage_batch(self.cfg, stage_at(self.cfg.stages, step)[0])
        return (
            f"resuming step {step} saved on {world} rank(s) ({strategy}) on {self.dist.world_size} ({self.strategy}): "
            f"the global batch ({batch}), data order and random draws are unchanged; the per-rank micro-batch is "
            f"{batch // (self.dist.world_size * accum)} (was {batch // (world * accum)}); results match an "
            f"uninterrupted run up to float summation order"
        )
