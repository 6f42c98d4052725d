"""The random numbers of a training step, as one rank sees them.

Every draw is made for the global batch (or micro-batch) from one generator on the training device (no host copy,
no sync), and this rank keeps its rows: W
ranks together draw exactly what one process would, so the samples, noise, times, masks, label and path drops of a
step do not depend on the world size. `Draws` is the one place that does this slicing; the trainer makes one per
step with `Draws.for_step`, whose generator is seeded from (seed, step) alone: resume needs no generator state,
and any step's draws can be reproduced on their own. The objective and the data path take it.
"""

from __future__ import annotations

import torch

from .distributed import Shard, shard_rows
from .masking import TokenMask, generator_device, make_mask

SINGLE: Shard = (0, 1)  # one process: all rows


def step_seed(seed: int, step: int) -> int:
    """The seed of global step `step` (0-based) of a run with train.seed `seed`."""
    return hash((seed, step)) & (2**63 - 1)


class Draws:
    def __init__(
        self, generator: torch.Generator | None = None, shard: Shard = SINGLE, device: torch.device | str | None = None
    ):
        """Draws from `generator` (None: torch's default), handed out on `device` (default: the generator's)."""
        self.generator = generator
        self.shard = shard
        self.device = torch.device(device) if device is not None else generator_device(generator)

    @classmethod
    def for_step(cls, seed: int, step: int, shard: Shard = SINGLE, device: torch.device | str = "cpu") -> "Draws":
        """The draws of global step `step` (0-based) of a run with train.seed `seed`, made on `device` (a CUDA
        generator draws other numbers than a CPU one for the same seed: a run's draws depend on its device type)."""
        return cls(torch.Generator(device).manual_seed(step_seed(seed, step)), shard)

    @property
    def source(self) -> torch.device | None:
        """Where the generator draws."""
        return generator_device(self.generator)

    def drawn(self, x: torch.Tensor) -> torch.Tensor:
        """A draw on the output device (a no-op when the generator is there)."""
        return x if self.device is None else x.to(self.device)

    def total(self, rows: int) -> int:
        """The global count of which this rank holds `rows`."""
        return rows * self.shard[1]

    def keep(self, drawn: torch.Tensor) -> torch.Tensor:
        """This rank's block of rows of a global draw (N, ...) -> (N / world, ...)."""
        return shard_rows(drawn, self.shard)

    def rand(self, rows: int) -> torch.Tensor:
        """(rows,) uniform in [0, 1)."""
        return self.keep(self.drawn(torch.rand(self.total(rows), generator=self.generator, device=self.source)))

    def randn(self, rows: int, *shape: int) -> torch.Tensor:
        """(rows, *shape) standard normal."""
        return self.keep(
            self.drawn(torch.randn((self.total(rows), *shape), generator=self.generator, device=self.source))
        )

    def randint(self, high: int, rows: int) -> torch.Tensor:
        """(rows,) integers in [0, high)."""
        return self.keep(
            self.drawn(torch.randint(0, high, (self.total(rows),), generator=self.generator, device=self.source))
        )

    def randn_at(self, index: torch.Tensor, *shape: int) -> torch.Tensor:
        """(len(index), *shape): rows `index` of a global standard-normal draw of len(index) x world rows (a rank's
        rows need not be one block: with gradient accumulation they are a block of every micro-batch)."""
        drawn = torch.randn((self.total(len(index)), *shape), generator=self.generator, device=self.source)
        return self.drawn(drawn[index.to(drawn.device)])

    def mask(self, rows: int, grid: tuple[int, int], ratio: float, mask_type: str, tiles: int = 1) -> TokenMask | None:
        """This rank's rows of a token mask drawn for the global micro-batch (None when nothing is dropped); tiles:
        masking.make_mask's."""
        mask = make_mask(self.total(rows), grid, ratio, mask_type, self.generator, tiles)
        rank = self.shard[0]
        return (
            None if mask is None else mask.rows(rank * rows, (rank + 1) * rows).to(self.device or mask.ids_keep.device)
        )
