"""Multi-process runs under torchrun: the process group, rank helpers, and the pure functions that split
a global batch, a list of samples or an optimizer state between ranks.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) a run is one plain process with no process
group, and every helper here degrades to a no-op. Under torchrun the backend is nccl on CUDA (device
cuda:LOCAL_RANK) and gloo on CPU; every collective has the configured timeout, and a timed-out or failed
collective is reported as one line naming the rank and what it was waiting for.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UserError

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
Shard = tuple[int, int]  # (this rank, world size)
TIMEOUT_MARKS = ("timed out", "timeout")
# Words in the messages of failed collectives (gloo raises plain RuntimeErrors); other errors pass through.
COLLECTIVE_FAILURES = TIMEOUT_MARKS + ("connection", "gloo", "nccl", "peer")


@dataclass
class DistributedConfig:
    """How a torchrun launch splits the work; ignored by a single process (no RANK/WORLD_SIZE in the env)."""

    # ddp (replicated model) | fsdp (FSDP2 fully_shard per block + root: params, grads, optimizer sharded)
    strategy: str = "ddp"
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU | nccl | gloo
    # a collective waiting longer than this fails (a rank crashed or hangs); exceed rank-0-only work such as eval
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"distributed.strategy is {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.backend not in BACKENDS:
            raise UserError(f"distributed.backend is {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.timeout_s <= 0:
            raise UserError(f"distributed.timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; world_size 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DistributedConfig.timeout_s

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return self.rank, self.world_size

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def pick_device(name: str) -> torch.device:
    if not DEVICE.match(name):
        raise UserError(f"device {name!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but no CUDA device is available; use auto or cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was asked for but Metal is not available; use auto or cpu")
    return torch.device(name)


def rank_device(name: str) -> torch.device:
    """pick_device, with a bare `cuda` meaning this rank's GPU (LOCAL_RANK under torchrun)."""
    device = pick_device(name)
    return torch.device("cuda", env_world()[2]) if device.type == "cuda" and device.index is None else device


def joined(device: torch.device) -> Dist:
    """This process's place in the process group it has joined (e.g. in `process_group_from_env`); one process
    otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist(device=device)
    return Dist(dist.get_rank(), dist.get_world_size(), env_world()[2], device)


def init_from_env(cfg: DistributedConfig, device: torch.device) -> Dist:
    """Join the process group torchrun describes (or reuse one already joined); a plain process without it.

    `device` is the one the run asked for (e.g. from train.device): a CUDA device becomes cuda:LOCAL_RANK.
    """
    rank, world, local = env_world()
    if world == 1:
        return Dist(device=device, timeout_s=cfg.timeout_s)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError(
            "distributed.backend nccl needs CUDA GPUs, none is available; use backend gloo (or auto) on CPU"
        )
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s), **kwargs)
    return Dist(rank, world, local, device, cfg.timeout_s)


@contextlib.contextmanager
def process_group_from_env() -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1), a process group for the command's duration; otherwise nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group (if any); safe to call more than once."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(d: Dist, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective inside the block into one line naming the rank and the wait."""
    try:
        yield
    except RuntimeError as err:  # nccl raises DistBackendError (a RuntimeError), gloo a plain RuntimeError
        text = str(err).strip().lower()
        if not d.active or not (isinstance(err, dist.DistError) or any(m in text for m in COLLECTIVE_FAILURES)):
            raise
        timed_out = any(m in text for m in TIMEOUT_MARKS)
        first = str(err).strip().splitlines()[0] if text else type(err).__name__
        cause = f"timed out after {d.timeout_s:g}s (distributed.timeout_s)" if timed_out else f"failed ({first})"
        raise UserError(f"rank {d.rank}/{d.world_size}: {what} {cause}; another rank crashed or hangs") from None


def barrier(d: Dist, what: str) -> None:
    if d.active:
        with collective(d, what):
            dist.barrier()


def mean_over_ranks(d: Dist, value: torch.Tensor, what: str = "averaging the logged loss") -> torch.Tensor:
    """The mean of a scalar tensor over ranks (the value itself in a single process)."""
    if not d.active:
        return value
    out = value.detach().clone().to(d.device)
    with collective(d, what):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / d.world_size


def any_over_ranks(d: Dist, flags: torch.Tensor, what: str) -> list[bool]:
    """Each of a 1-D tensor of flags, true if it is true on any rank (the local flags in a single process)."""
    out = flags.to(d.device, torch.int32)
    if d.active:
        with collective(d, what):
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return [bool(v) for v in out.tolist()]


def gather_to_main(d: Dist, obj: Any, what: str) -> list[Any] | None:
    """Every rank's `obj` as a list in rank order on rank 0 (None elsewhere); [obj] in a single process."""
    if not d.active:
        return [obj]
    out = [None] * d.world_size if d.is_main else None
    with collective(d, what):
        dist.gather_object(obj, out, dst=0)
    return out


# ----------------------------------------------------------------------------------- pure splitting


def shard_rows(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """A rank's contiguous block of rows of x, which was drawn (or loaded) for every rank: (N, ...) -> (N / world,
    ...)."""
    rank, world = shard
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def check_divisible(batch: int, world: int, accum: int, where: str) -> int:
    """The per-rank micro-batch of a global batch, or a one-line error if it is not a whole number."""
    if batch % (world * accum):
        raise UserError(
            f"{where}: global batch {batch} is not divisible by world size {world} x train.grad_accum {accum}; "
            f"choose a batch that is a multiple of {world * accum}"
        )
    return batch // (world * accum)


def rank_rows(batch: int, micro_batches: int, shard: Shard) -> torch.Tensor:
    """Row indices of a global batch that a rank trains on: its block of every accumulation micro-batch.

    World size 1 gives all rows in order; with W ranks, rank r takes rows [k M + r M/W, k M + (r+1) M/W)
    of micro-batch k (M = batch / micro_batches), so micro-batch k covers the same samples for any W.
    """
    rank, world = shard
    micro = batch // micro_batches
    share = micro // world
    return torch.cat(
        [torch.arange(k * micro + rank * share, k * micro + (rank + 1) * share) for k in range(micro_batches)]
    )


def batches_of_rank(n: int, batch: int, shard: Shard) -> list[range]:
    """The sampling batches (index ranges of a list of n samples, `batch` each) rank r generates: r, r + W, ...

    Whole batches move between ranks, never single samples, so every sample is computed in the same batch
    (and the same arithmetic) for any world size.
    """
    rank, world = shard
    starts = list(range(0, n, batch))[rank::world]
    return [range(s, min(s + batch, n)) for s in starts]


def optimizer_state_by_index(state: dict, names: list[str]) -> dict:
    """An FQN-keyed optimizer state (torch.distributed.checkpoint) -> torch's usual index-keyed form.

    `names` are the trainable parameters' names in the optimizer's order, so the file format does not
    depend on the strategy."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """The inverse of optimizer_state_by_index."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}
