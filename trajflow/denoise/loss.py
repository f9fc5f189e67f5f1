r"""Self-distillation of a learned denoiser from the frozen NTM's trajectory score (NTM §3.4, method.md 5.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_count, check_event_shape, check_finite
from ..conditioning import Condition, check_cond
from ..losses import check_probability, guidance_dropout, t_min_range
from ..model import NTM
from ..process import SAMPLE_T_MIN, MarkovInterpolant, sample_t_min, time_grid
from .networks import LearnedDenoiser
from .score import trajectory_score_denoise

__all__ = ["DistillationLoss"]


@dataclass
class DistillationLoss:
    r"""Self-distillation of a learned denoiser from the frozen NTM's trajectory score (NTM §3.4).

    For real data :math:`x_0` (method.md 5.2): draw :math:`t_{\min}`, the grid and the forward trajectory,
    :math:`u_{t_0} = f_T(x_{t_0}, t_0)` and the target :math:`\hat x_0^{den}` =
    :func:`trajectory_score_denoise` under the teacher; the loss is
    :math:`\| g_\phi(u_{t_0}, t_0, y) - \hat x_0^{den} \|^2` averaged over dimensions.

    Arguments:
        teacher: The trained NTM, not updated (freeze it with ``requires_grad_(False)``).
        steps: :math:`T` of the grids (train at the :math:`T` used for sampling).
        t_min: Range of :math:`t_0`; default the sampling value :data:`~trajflow.process.SAMPLE_T_MIN`.
        shift: The grid's shift (see :func:`trajflow.time_grid`).
        cond_drop: Probability of the null condition per example (teacher and student alike).
        clip_percentile: Gradient clipping of :func:`trajectory_score_denoise`.
    """

    teacher: NTM
    steps: int = 4
    t_min: tuple[float, float] = (SAMPLE_T_MIN, SAMPLE_T_MIN)
    shift: float = 1.0
    cond_drop: float = 0.1
    clip_percentile: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, NTM):
            raise ValueError(f"teacher: expected an NTM, got {type(self.teacher).__name__}")
        check_count("steps", self.steps)
        self.t_min = t_min_range(self.t_min)
        check_probability("cond_drop", self.cond_drop)

    def targets(
        self, x0: Tensor, cond: Condition | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(u0, t0, target, drop)``: the student's inputs ``(B, *data)``, ``(B,)``, the detached targets
        ``(B, *data)`` and the condition-dropout mask (``None`` or ``(B,)``)."""
        teacher = self.teacher
        event = teacher.event_shape
        check_event_shape("x0", x0, event)
        if x0.dim() != len(event) + 1:
            raise ValueError(f"x0: expected shape (batch, {', '.join(map(str, event))}), got {tuple(x0.shape)}")
        check_finite("x0", x0)
        n, device = x0.shape[0], x0.device
        check_cond(teacher, cond, x0.shape[:1])
        t0 = sample_t_min((n,), *self.t_min, generator=generator, device=device)
        grid = time_grid(self.steps, t0, self.shift, device=device)  # (B, T + 1)
        drop = guidance_dropout(n, self.cond_drop if cond is not None else 0.0, device, generator)
        traj = MarkovInterpolant(event_dim=len(event)).sample(x0, grid, generator=generator)  # (B, T + 1, *data)
        dist = teacher.distribution(grid, cond, drop_cond=drop, validate_args=False)
        target = trajectory_score_denoise(dist, traj, clip_percentile=self.clip_percentile)
        with torch.no_grad():
            u0, _ = dist._transport(traj[:, 0], t0)  # with the condition, if the transporter sees it
        return u0.detach(), t0, target.detach(), drop

    def __call__(
        self,
        denoiser: LearnedDenoiser,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if torch.Size(denoiser.event_shape) != self.teacher.event_shape:
            raise ValueError(
                f"denoiser: its event shape {tuple(denoiser.event_shape)} differs from the teacher's "
                f"{tuple(self.teacher.event_shape)}"
            )
        u0, t0, target, drop = self.targets(x0, cond, generator=generator)
        pred = denoiser(u0, t0, cond, drop)
        return (pred.float() - target.float()).square().mean()
