r"""Progressive distillation of a flow-matching teacher: each round halves the number of Euler steps.

A round distils a teacher sampled with ``teacher_steps`` Euler steps into a student sampled with
``teacher_steps / 2``: one student step :math:`t_{2j} \to t_{2j-2}` must land where two teacher steps
:math:`t_{2j} \to t_{2j-1} \to t_{2j-2}` land. For a velocity model that step is the average velocity
:math:`(x_t - x_{\text{end}}) / (t - t_{\text{end}})`, which the student regresses. The student starts as a
copy of the teacher, then becomes the next round's teacher (:func:`distillation_rounds` lists the rounds).

The student samples with :func:`~trajflow.baselines.euler_sample` at ``teacher_steps / 2`` steps and the
same ``shift``: :func:`~trajflow.time_grid` with ``N`` steps is exactly the even points of its grid with
``2N`` steps (:math:`k / N = 2k / 2N`, then the same shift), so the grids nest.

References:
    | Progressive Distillation for Fast Sampling of Diffusion Models (Salimans & Ho, 2022).
    | https://arxiv.org/abs/2202.00512 (here on the flow-matching ODE, with a velocity target)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import check_count, check_event_shape, check_tensor
from ..conditioning import Condition
from ..numerics import upcast
from ..process import time_grid
from ..velocity import VelocityModel
from .flow_matching import check_batch, interpolate, noise_and_drop

__all__ = ["ProgressiveDistillationLoss", "distillation_rounds"]


def distillation_rounds(start_steps: int = 64, end_steps: int = 4) -> list[int]:
    """The teacher's steps in each round, halving from ``start_steps`` until the student has ``end_steps``.

    ``start_steps / end_steps`` must be a power of two >= 2.

    Example:
        >>> distillation_rounds(64, 4)
        [64, 32, 16, 8]
    """
    ratio = check_count("start_steps", start_steps) // check_count("end_steps", end_steps)
    if start_steps != end_steps * ratio or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(
            f"(start_steps, end_steps): expected start_steps = end_steps * 2^k with k >= 1, "
            f"got ({start_steps}, {end_steps})"
        )
    return [start_steps >> k for k in range(ratio.bit_length() - 1)]


@dataclass
class ProgressiveDistillationLoss:
    r"""Mean squared error :math:`\| v_{\text{student}}(x_t, t, y) - \bar v \|^2` per dimension, where
    :math:`\bar v` is the average velocity of two deterministic teacher Euler steps from :math:`t`.

    Per example, a student step :math:`j \sim U\{1, \dots, N\}` (``N = teacher_steps / 2``) of the ascending
    grid :math:`t_k` = ``time_grid(teacher_steps, 0, shift)`` gives :math:`t = t_{2j}`, and
    :math:`x_t = (1 - t) x_0 + t \epsilon`. The teacher is frozen here (``requires_grad_(False)``, ``eval()``):
    pass a copy of a model that still trains.

    Arguments:
        teacher: The velocity model sampled with ``teacher_steps`` Euler steps.
        teacher_steps: The teacher's steps, even; the student learns ``teacher_steps / 2``.
        shift: The time grid's shift (see :func:`trajflow.time_grid`), the same for teacher and student.
        cond_drop: Probability of the null condition per example (teacher and student both see it).

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> teacher = MLPVelocity(2, width=8, depth=1, time_features=4)
        >>> loss = ProgressiveDistillationLoss(teacher, teacher_steps=8)
        >>> loss(MLPVelocity(2, width=8, depth=1, time_features=4), torch.randn(5, 2)).shape
        torch.Size([])
    """

    teacher: VelocityModel
    teacher_steps: int
    shift: float = 1.0
    cond_drop: float = 0.1
    grid: Tensor = field(init=False, repr=False)  # (teacher_steps + 1,) ascending, t_0 = 0, t_2N = 1

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, nn.Module) or not hasattr(self.teacher, "event_shape"):
            raise ValueError(
                f"teacher: expected a velocity model with an event_shape, got {type(self.teacher).__name__}"
            )
        steps = self.teacher_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2 or steps % 2:
            raise ValueError(f"teacher_steps: expected an even integer >= 2, got {steps!r}")
        self.grid = time_grid(steps, 0.0, self.shift)  # float32, as euler_sample's grid
        self.teacher.requires_grad_(False).eval()

    @property
    def student_steps(self) -> int:
        """The student's Euler steps, ``teacher_steps / 2``."""
        return self.teacher_steps // 2

    @torch.no_grad()
    def target(
        self, x_t: Tensor, index: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        r"""The student's target velocity at :math:`x_t` for its steps ``index`` ``(N,)`` in ``1..student_steps``.

        Two teacher Euler steps :math:`t \to t_{\text{mid}} \to t_{\text{end}}` reach :math:`x_{\text{end}}`;
        the target is :math:`(x_t - x_{\text{end}}) / (t - t_{\text{end}})`, summed here as the time-weighted
        mean of the two velocities (the same value, without the cancellation of :math:`x_t - x_{\text{end}}`).
        """
        check_event_shape("x_t", x_t, self.teacher.event_shape)
        check_tensor("index", index)
        if index.dtype != torch.long or index.shape != x_t.shape[:1]:
            raise ValueError(
                f"index: expected a long tensor of shape ({x_t.shape[0]},), got {index.dtype} {tuple(index.shape)}"
            )
        if index.numel() and not bool(((index >= 1) & (index <= self.student_steps)).all()):
            raise ValueError(
                f"index: expected student steps in 1..{self.student_steps}, "
                f"got values in [{int(index.min())}, {int(index.max())}]"
            )
        return self._target(x_t, index, cond, drop_cond)

    def _target(self, x_t: Tensor, index: Tensor, cond: Condition | None, drop_cond: Tensor | None) -> Tensor:
        t, mid, end = self._times(index, x_t.device)
        shape = (-1, *([1] * (x_t.dim() - 1)))  # times broadcast over the event dims
        v1, _ = self.teacher(x_t, t, cond, drop_cond)
        x_mid = x_t + (mid - t).reshape(shape) * v1  # euler_sample's update, x + (s - t) v
        v2, _ = self.teacher(x_mid, mid, cond, drop_cond)
        return ((t - mid).reshape(shape) * v1 + (mid - end).reshape(shape) * v2) / (t - end).reshape(shape)

    def _times(self, index: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, t_mid, t_end)`` ``(N,)`` each, for student steps ``index`` ``(N,)``: grid points 2j, 2j-1, 2j-2."""
        grid = self.grid.to(device)
        return grid[2 * index], grid[2 * index - 1], grid[2 * index - 2]

    def __call__(
        self,
        student: VelocityModel,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if tuple(student.event_shape) != tuple(self.teacher.event_shape):
            raise ValueError(
                f"student: expected the teacher's event shape {tuple(self.teacher.event_shape)}, "
                f"got {tuple(student.event_shape)}"
            )
        # the teacher's condition, which the student takes too (its targets are the teacher's)
        check_batch(student, x0, cond, cond_model=self.teacher)
        index = torch.randint(1, self.student_steps + 1, x0.shape[:1], device=x0.device, generator=generator)  # (N,)
        eps, drop = noise_and_drop(x0, cond, self.cond_drop, generator)
        t = self._times(index, x0.device)[0]
        x_t = interpolate(x0, eps, t)
        with torch.no_grad():
            target = self._target(x_t, index, cond, drop)  # no value checks: no GPU sync
        v, _ = student(x_t, t, cond, drop)
        return (upcast(v) - upcast(target)).square().mean()
