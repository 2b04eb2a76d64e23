"""The order of a stage's batches: a pure function of ``(seed, epoch)``, each rank taking its slice
of every global batch, so P processes see the batches one process sees at the same global batch
size, and a resumed run those of an uninterrupted one."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from xmodal.errors import ConfigError


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch; the order depends only on ``(seed, epoch)``.

    Args:
        size: dataset length.
        batch_size: the global batch size, split evenly over ``world`` ranks.
        shuffle: permute the dataset each epoch (a ``randperm`` seeded by ``seed, epoch``).
        drop_last: drop a last partial global batch (training); evaluation keeps it.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ConfigError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.epoch, self.drop_last = seed, epoch, drop_last
        self.rank, self.world = rank, world

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for start in range(0, self.size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            share = math.ceil(len(batch) / self.world)
            mine = batch[self.rank * share : (self.rank + 1) * share]
            if len(mine):
                yield mine.tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        if self.drop_last or not rest:
            return full
        share = math.ceil(rest / self.world)
        return full + (1 if self.rank * share < rest else 0)
