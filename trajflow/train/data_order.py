"""Data order that depends only on ``(seed, epoch)``, so that a resumed run sees exactly the batches it would have."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

if TYPE_CHECKING:
    from .config import TrainerConfig

__all__ = ["mix_seed", "ResumableSampler", "to_device", "endless_batches"]


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
    if isinstance(batch, (list, tuple)) and any(isinstance(v, Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def endless_batches(
    dataset: Dataset, collate_fn: Callable | None, position: dict[str, int], config: TrainerConfig, accelerator: Any
) -> Iterator[Any]:
    """Endless batches of this process from ``position`` = {epoch, batch_in_epoch} on; updates ``position``.

    A map-style dataset is read in :class:`ResumableSampler` order from the consumed part of the epoch on; a
    stream (``IterableDataset``) is re-opened at the epoch start and the consumed batches are re-read and
    dropped. With several processes, every one moves to the next epoch as soon as one runs dry.

    Raises:
        ValueError: A process would get fewer than ``batch_size`` examples per epoch, or a whole epoch yields
            no complete batch.
    """
    synced = isinstance(dataset, IterableDataset) and accelerator.num_processes > 1
    while True:
        skip = position["batch_in_epoch"]
        batches = _epoch_batches(dataset, collate_fn, position["epoch"], skip, config, accelerator)
        for batch in _while_every_rank_has_one(batches, accelerator) if synced else batches:
            position["batch_in_epoch"] += 1
            yield batch
        if position["batch_in_epoch"] == skip == 0:
            raise ValueError("dataset: yielded no complete batch in a whole epoch (is it empty or too small?)")
        position["epoch"] += 1
        position["batch_in_epoch"] = 0


def _while_every_rank_has_one(batches: Iterator[Any], accelerator: Any) -> Iterator[Any]:
    """The batches of a stream until one rank runs dry: streams may give ranks different numbers of batches,
    and the others would wait forever in the gradient all-reduce."""
    while True:
        batch = next(batches, None)
        have = torch.tensor([0.0 if batch is None else 1.0], device=accelerator.device)
        if float(accelerator.gather(have).min()) == 0.0:  # a collective: every rank asks
            return
        yield batch


def _epoch_batches(
    dataset: Dataset, collate_fn: Callable | None, epoch: int, skip: int, config: TrainerConfig, accelerator: Any
) -> Iterator[Any]:
    """The batches of ``epoch`` after the first ``skip`` (an iterator over a fresh DataLoader)."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    # A generator for the DataLoader's own draws (worker base seeds): without it, creating the
    # iterator would consume the global RNG at a point that differs between a run and its resumption.
    loader_gen = torch.Generator().manual_seed(mix_seed(config.seed, epoch, rank, 2))
    common = dict(
        batch_size=config.batch_size,
        drop_last=True,
        num_workers=config.num_workers,
        collate_fn=collate_fn,
        generator=loader_gen,
        pin_memory=accelerator.device.type == "cuda",
    )
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        it = iter(DataLoader(dataset, **common))
        for _ in range(skip):  # streams cannot seek: re-read and drop the consumed batches
            next(it, None)
        return it
    sampler = ResumableSampler(len(dataset), seed=config.seed, shuffle=config.shuffle, rank=rank, world_size=world_size)
    if len(sampler) < config.batch_size:
        raise ValueError(
            f"dataset: expected at least batch_size={config.batch_size} examples per process, got "
            f"{len(sampler)} (dataset of {len(dataset)} over {world_size} processes)"
        )
    sampler.set_position(epoch, skip * config.batch_size)
    return iter(DataLoader(dataset, sampler=sampler, **common))
