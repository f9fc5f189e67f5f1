"""The training data of a toy run as a map-style dataset, so that :class:`~trajflow.train.Trainer` can
shuffle it, skip what a resumed run already consumed, and give every method the same points."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from examples.toy.config import ToyConfig
from trajflow.data.toy import toy_density

__all__ = ["ToyTrainingSet", "whole_batch", "SECONDS_POOL_BATCHES"]

#: With a time budget the number of steps is unknown: the training set then holds this many batches and
#: the Trainer goes over it again (reshuffled) when a method takes more steps.
SECONDS_POOL_BATCHES = 2000


class ToyTrainingSet(Dataset):
    """A fixed-seed sample of ``cfg.density``: ``max_steps * batch_size`` points with a ``max_steps`` budget
    (each point used once, as a fresh stream would), ``SECONDS_POOL_BATCHES * batch_size`` with a ``time_budget``.

    The sample depends on ``cfg.density``, ``cfg.seed``, the budget and ``cfg.batch_size`` alone, so every
    method of a run trains on the same points. A whole batch is one tensor index (:meth:`__getitems__`, which
    the DataLoader calls instead of ``__getitem__`` per point); pass :func:`whole_batch` as the collate
    function.

    Example:
        >>> data = ToyTrainingSet(ToyConfig(max_steps=3, batch_size=4))
        >>> len(data), whole_batch(data.__getitems__([0, 5, 2])).shape
        (12, torch.Size([3, 2]))
    """

    def __init__(self, cfg: ToyConfig) -> None:
        batches = cfg.max_steps if cfg.max_steps is not None else SECONDS_POOL_BATCHES
        # Drawn on the CPU so that the points do not depend on the device: (batches * batch_size, 2).
        self.points = toy_density(cfg.density).sample(
            batches * cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed)
        )

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.points[index]

    def __getitems__(self, indices: list[int]) -> Tensor:
        # One gather instead of len(indices) Python-level lookups and a stack: a toy step is ~10 ms.
        return self.points[torch.as_tensor(indices)]


def whole_batch(batch: Tensor) -> Tensor:
    """The DataLoader's collate function for :class:`ToyTrainingSet`: the batch is already one tensor."""
    return batch
