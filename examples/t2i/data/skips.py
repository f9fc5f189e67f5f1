"""Counters of skipped samples that the main process can read while DataLoader workers do the skipping.

A DataLoader gives every worker its own copy of the dataset, so a plain ``self.skipped += 1`` in a worker is
never seen by the process that asks. :class:`SkipCounter` keeps its counts in a small shared-memory tensor
instead, one row per worker (so no two processes ever write the same cell and no lock is needed); both
``fork`` and ``spawn`` workers share it, since torch pickles shared tensors by handle for worker start-up.
Each distributed rank is its own process tree, so a rank counts only what it read.

Example:
    >>> c = SkipCounter(("corrupt_image", "missing_caption"))
    >>> c.add("corrupt_image"); c.add("missing_caption", 2)
    >>> c.as_dict(), c.total()
    ({'corrupt_image': 1, 'missing_caption': 2}, 3)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

__all__ = ["SkipCounter", "warn_skip"]

# Rows for the main process (row 0) and workers 0..62; a worker id past that shares a row (mod), which can
# only lose a count if two such workers collide on the same increment.
_ROWS = 64


class SkipCounter:
    """Named counters summed over the main process and every DataLoader worker of this process tree."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self._counts = torch.zeros(_ROWS, len(self.keys), dtype=torch.int64).share_memory_()

    def add(self, key: str, n: int = 1) -> None:
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (_ROWS - 1)
        self._counts[row, self.keys.index(key)] += n

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.keys, self._counts.sum(0).tolist()))

    def total(self, exclude: Sequence[str] = ()) -> int:
        return sum(v for k, v in self.as_dict().items() if k not in exclude)

    def reset(self) -> None:
        self._counts.zero_()


def warn_skip(what: str, reason: str) -> None:
    """Warn that one sample was skipped (from a worker, the warning shows on that worker's stderr)."""
    warnings.warn(f"trajflow: skipping {what}: {reason}", RuntimeWarning, stacklevel=3)
