r"""Flow matching on the same backbones: the baseline of every benchmark (training loss and ODE samplers).

A velocity model :math:`v_\theta(x_t, t, y)` is trained to regress :math:`\epsilon - x_0` on
:math:`x_t = (1 - t) x_0 + t \epsilon` (rectified flow / conditional flow matching), then sampled by
integrating :math:`dx/dt = v` from :math:`t = 1` (noise) to :math:`t = 0` (data).

References:
    | Flow Matching for Generative Modeling (Lipman et al., 2023). https://arxiv.org/abs/2210.02747
    | Flow Straight and Fast (Liu et al., 2023). https://arxiv.org/abs/2209.03003
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022),
    | Algorithm 1 (Heun's second-order sampler). https://arxiv.org/abs/2206.00364
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_event_shape, check_finite
from ..conditioning import Condition
from ..losses import guidance_dropout
from ..numerics import upcast
from ..process import time_grid
from ..velocity import MLPVelocity, VelocityModel, guided_velocity

__all__ = [
    "VelocityModel",
    "MLPVelocity",
    "FlowMatchingLoss",
    "euler_sample",
    "heun_sample",
    "guided_velocity",
]


@dataclass
class FlowMatchingLoss:
    r"""Mean squared error :math:`\| v_\theta(x_t, t, y) - (\epsilon - x_0) \|^2` per dimension.

    Arguments:
        cond_drop: Probability of the null condition per example (for classifier-free guidance).
    """

    cond_drop: float = 0.1

    def __call__(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        check_event_shape("x0", x0, model.event_shape)
        n = x0.shape[0]
        t = torch.rand(n, device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        tb = t.reshape(n, *([1] * (x0.dim() - 1)))
        x_t = (1 - tb) * x0 + tb * eps
        drop = guidance_dropout(n, self.cond_drop if cond is not None else 0.0, x0.device, generator)
        v, _ = model(x_t, t, cond, drop)
        return (upcast(v) - upcast(eps - x0)).square().mean()


def _times(steps: int, shift: float, device: torch.device) -> Tensor:
    """Descending times ``1 = t_T > ... > t_0 = 0`` on the same (shifted) grid as NTM."""
    return time_grid(steps, 0.0, shift, device=device).flip(0)


@torch.no_grad()
def euler_sample(
    model: VelocityModel,
    noise: Tensor,
    steps: int,
    *,
    cond: Condition | None = None,
    guidance: float = 0.0,
    shift: float = 1.0,
) -> Tensor:
    r"""Euler integration of :math:`dx/dt = v` from :math:`t = 1` to 0 in ``steps`` steps.

    Arguments:
        model: The velocity model.
        noise: :math:`x_1 \sim \mathcal{N}(0, I)`, shape ``(N, *event)``.
        steps: Number of steps (network evaluations without guidance).
        cond: Flat condition ``(N, ...)`` or ``None``.
        guidance: Classifier-free guidance weight.
        shift: The time grid's shift (see :func:`trajflow.time_grid`).
    """
    check_event_shape("noise", noise, model.event_shape)
    check_finite("noise", noise)
    ts = _times(steps, shift, noise.device)
    x = noise
    for t, s in zip(ts[:-1], ts[1:]):
        v = guided_velocity(model, x, t.expand(x.shape[0]), cond, guidance)
        x = x + (s - t) * v
    return x


@torch.no_grad()
def heun_sample(
    model: VelocityModel,
    noise: Tensor,
    steps: int,
    *,
    cond: Condition | None = None,
    guidance: float = 0.0,
    shift: float = 1.0,
) -> Tensor:
    r"""Heun's second-order integration (EDM Algorithm 1 without churn); the last step is Euler.

    Uses :math:`2 \cdot \text{steps} - 1` network evaluations. Arguments as in :func:`euler_sample`.
    """
    check_event_shape("noise", noise, model.event_shape)
    check_finite("noise", noise)
    ts = _times(steps, shift, noise.device)
    x = noise
    n = x.shape[0]
    velocity: Callable[[Tensor, Tensor], Tensor] = lambda y, t: guided_velocity(  # noqa: E731
        model, y, t.expand(n), cond, guidance
    )
    for t, s in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        x_next = x + (s - t) * v
        if s > 0:  # the trapezoidal correction, except at t = 0 where v is not needed
            x_next = x + (s - t) * 0.5 * (v + velocity(x_next, s))
        x = x_next
    return x
