r"""Flow matching on the same backbones: the baseline of every benchmark and the source of initialisation.

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

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import check_event_shape, check_finite
from .conditioning import Condition, EventDims
from .losses import guidance_dropout
from .nn.condition import ConditionEmbedding
from .nn.embeddings import SinusoidalEmbedding
from .nn.mlp import ResidualMLP
from .numerics import upcast
from .process import time_grid

__all__ = [
    "VelocityModel",
    "MLPVelocity",
    "FlowMatchingLoss",
    "euler_sample",
    "heun_sample",
    "guided_velocity",
]


class VelocityModel(nn.Module, ABC):
    """Base class of velocity models ``(x_t, t, cond, drop_cond) -> (v, hidden)``.

    Calls are flat: ``x_t`` is ``(N, *event_shape)``, ``t`` is ``(N,)``; ``hidden`` holds the backbone's
    last hidden states (used to initialise an NTM predictor from this model).
    """

    event_shape: torch.Size
    cond_event_dims: EventDims | None = None

    @abstractmethod
    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


class MLPVelocity(VelocityModel):
    """A residual-MLP velocity model for vectors (the same backbone as :class:`~trajflow.predictors.MLPPredictor`).

    Example:
        >>> v, h = MLPVelocity(features=2)(torch.randn(3, 2), torch.rand(3))
        >>> v.shape, h.shape
        (torch.Size([3, 2]), torch.Size([3, 256]))
    """

    def __init__(
        self,
        features: int,
        *,
        num_classes: int | None = None,
        cond_features: int = 0,
        width: int = 256,
        depth: int = 3,
        time_features: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features: expected a positive integer, got {features!r}")
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        self.condition = ConditionEmbedding(time_features, num_classes=num_classes, cond_features=cond_features)
        self.cond_event_dims = self.condition.cond_event_dims
        self.backbone = ResidualMLP(features, 2 * time_features, width, depth)
        self.head = nn.Linear(width, features)
        self.width = width

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        c = torch.cat([self.time(t), self.condition(cond, drop_cond, x_t.shape[0])], dim=-1)
        h = self.backbone(x_t, c.to(x_t.dtype))
        return self.head(h), h


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


def guided_velocity(
    model: VelocityModel, x: Tensor, t: Tensor, cond: Condition | None, guidance: float
) -> Tensor:
    r""":math:`(1 + w) v_c - w v_u`, with both branches in one batched call when :math:`w > 0`."""
    if guidance <= 0 or cond is None:
        return model(x, t, cond)[0]
    n = x.shape[0]
    if isinstance(cond, Tensor):
        cond2 = torch.cat([cond, cond])
    else:
        cond2 = tuple(torch.cat([c, c]) for c in cond)
    drop = torch.arange(2 * n, device=x.device) >= n  # the second half takes the null condition
    v, _ = model(torch.cat([x, x]), torch.cat([t, t]), cond2, drop)
    v_c, v_u = v.chunk(2)
    return (1 + guidance) * v_c - guidance * v_u


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
