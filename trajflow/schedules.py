r"""Learning-rate schedules: linear warmup followed by a cosine decay (NTM Table 5: "cosine with warmup").

The schedule is a picklable callable, so that a :class:`torch.optim.lr_scheduler.LambdaLR` on it saves and
restores it with ``state_dict()`` (a lambda could not be pickled).

Example:
    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.0)
    >>> [round(opt.param_groups[0]["lr"], 3)]
    [0.5]
    >>> for _ in range(3):
    ...     opt.step(); sched.step()
    >>> round(opt.param_groups[0]["lr"], 3)
    0.962
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["CosineWarmup", "cosine_with_warmup"]


@dataclass
class CosineWarmup:
    r"""The multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    * warmup, ``step < warmup_steps``: :math:`(\text{step} + 1) / \text{warmup\_steps}`, so the very
      first update already uses a non-zero rate (a zero first step would waste a batch);
    * then a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``, and ``min_lr_ratio`` after.

    Arguments:
        warmup_steps: Steps of linear warmup (0 for none).
        total_steps: The step at which the cosine reaches its floor.
        min_lr_ratio: Floor as a fraction of the peak rate (NTM: 1e-6 / 1e-4 = 0.01).

    Example:
        >>> f = CosineWarmup(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
        >>> f(0), f(9), round(f(60), 3), f(110), f(500)
        (0.1, 1.0, 0.55, 0.1, 0.1)
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps: expected a positive integer, got {self.total_steps!r}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps: expected at most total_steps={self.total_steps}, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a fraction in [0, 1], got {self.min_lr_ratio!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` following :class:`CosineWarmup`; call ``step()`` once
    per optimizer step. Its ``state_dict()`` holds the step count and the schedule's parameters."""
    return LambdaLR(optimizer, CosineWarmup(warmup_steps, total_steps, min_lr_ratio))
