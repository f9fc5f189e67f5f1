"""Data order that depends only on ``(seed, epoch)``, so that a resumed run sees exactly the batches it would have."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["mix_seed", "ResumableSampler", "to_device"]


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (a fixed, platform-independent hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler[int]):
    """A per-rank sampler whose epoch order depends only on ``(seed, epoch)`` and that can start mid-epoch.

    Every rank draws the same permutation of ``range(length)``, drops the tail that does not divide evenly
    (so that ranks take the same number of steps, which DDP needs) and takes every ``world_size``-th index
    from ``rank``. :meth:`set_position` selects the epoch and how many of this rank's indices to skip.

    Example:
        >>> s = ResumableSampler(10, seed=0, rank=1, world_size=2)
        >>> s.set_position(epoch=0, start=0); full = list(s)
        >>> s.set_position(epoch=0, start=2); list(s) == full[2:]
        True
        >>> len(full)
        5
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise ValueError(f"length: expected a non-empty dataset, got length {length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in 0..{world_size - 1}, got {rank}")
        self.length, self.seed, self.shuffle = length, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        usable = self.length - self.length % self.world_size
        return perm[self.rank : usable : self.world_size]

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.length // self.world_size - self.start)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; strings and other values are left alone."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and any(isinstance(v, Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
