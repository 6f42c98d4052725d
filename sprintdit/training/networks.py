"""What one training process updates: the model, its EMA, the optimizer and loss scaler, wrapped for DDP or sharded
with FSDP2 and optionally compiled (`build_networks`); the gradient-sync switch of gradient accumulation."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..distributed import Dist, collective
from ..models import build_model


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each block and the root (embedders, fusion, final layer) become units of sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def full_state_options(cpu_offload: bool):
    """Options of torch.distributed.checkpoint.state_dict for full (unsharded) states; with cpu_offload only
    rank 0 receives them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


@dataclass
class Networks:
    """What one training process updates: the model, its EMA, the optimizer over the trainable parameters, and
    the callable a step runs forward (the model, DDP-wrapped and/or compiled)."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ddp: torch.nn.Module | None
    fsdp: bool  # model and EMA sharded with FSDP2
    forward: Callable
    param_names: list[str]  # the optimizer's order: its saved state is keyed by index
    params: list[torch.nn.Parameter]
    ema_params: list[torch.nn.Parameter]

    def full_ema(self, model_cfg, d: Dist) -> torch.nn.Module:
        """The EMA as a plain module in eval mode on every rank (FSDP: its shards gathered into a full copy, a
        collective that every rank calls)."""
        if not self.fsdp:
            return self.ema.eval()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        with collective(d, "gathering the EMA weights for sampling"):
            full = get_model_state_dict(self.ema, options=full_state_options(cpu_offload=False))
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
            ema = build_model(model_cfg).to(d.device)
        ema.load_state_dict(full)
        return ema.eval()

    def grad_sync(self, last: bool):
        """Gradients are averaged over ranks after the last micro-batch only (no_sync / FSDP2's gradient sync flag)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()


def build_networks(
    cfg: RunConfig, d: Dist, fsdp: bool, init_from: str | None = None, empty_text: torch.Tensor | None = None
) -> Networks:
    """Model (initial weights from train.seed, the same on every rank, or the weights of `init_from`), EMA,
    FSDP2 or DDP wrapping, AdamW and the loss scaler, on d.device. `empty_text` (L, E): the data's embedding of
    the empty caption, which a model on precomputed caption embeddings keeps as its unconditional input where its own
    is unset (all zero: a fresh model, a diffusers import without it); a set one (e.g. PixArt's learned) is kept."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(d.device)
    model.grad_checkpointing = t.grad_checkpointing
    if init_from is not None:  # the EMA starts from them too
        source = ckpt.resolve_weights(init_from, use_ema=True)
        ckpt.load_state(model, ckpt.load_weights(source)[0], source)
    if empty_text is not None and not model.y_embedder.empty.any():  # unset (all zero): the data's empty caption
        model.y_embedder.empty.copy_(empty_text)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if fsdp:  # the EMA is sharded like the model: each rank averages its own shards
        shard_model(model)
        shard_model(ema)
    trainable = [(n, p, e) for (n, p), e in zip(model.named_parameters(), ema.parameters()) if p.requires_grad]
    params = [p for _, p, _ in trainable]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.stages[0].lr,
        betas=tuple(t.optim.betas),
        weight_decay=t.optim.weight_decay,
        eps=t.optim.eps,
        fused=d.device.type == "cuda",
    )
    ddp = None
    if d.active and not fsdp:  # buffers are fixed and equal on every rank: no broadcast
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    wrapped = ddp or model
    forward = (
        torch.compile(wrapped, mode=t.compile_mode, fullgraph=t.compile_fullgraph, dynamic=False)
        if t.compile
        else wrapped
    )
    return Networks(
        model,
        ema,
        optimizer,
        torch.amp.GradScaler(d.device.type, enabled=t.precision == "fp16"),
        ddp,
        fsdp,
        forward,
        [n for n, _, _ in trainable],
        params,
        [e for _, _, e in trainable],
    )
