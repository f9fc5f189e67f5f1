r"""The velocity-model interface :math:`v_\theta(x_t, t, y)` and classifier-free guidance of a velocity."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..conditioning import Condition, CondSpec, EventDims, cat_cond

__all__ = ["VelocityModel", "guided_velocity"]


class VelocityModel(nn.Module, ABC):
    """Base class of velocity models ``(x_t, t, cond, drop_cond) -> (v, hidden)``.

    Calls are flat: ``x_t`` is ``(N, *event_shape)``, ``t`` is ``(N,)``; ``hidden`` holds the backbone's
    last hidden states (used to initialise an NTM predictor from this model).
    """

    event_shape: torch.Size
    cond_event_dims: EventDims | None = None
    #: What the condition is, where the model knows it (see :func:`trajflow.conditioning.check_cond`).
    cond_spec: CondSpec | None = None

    @abstractmethod
    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


def guided_velocity(model: VelocityModel, x: Tensor, t: Tensor, cond: Condition | None, guidance: float) -> Tensor:
    r""":math:`(1 + w) v_c - w v_u`, with both branches in one batched call when :math:`w > 0`."""
    if guidance <= 0 or cond is None:
        return model(x, t, cond)[0]
    n = x.shape[0]
    drop = torch.arange(2 * n, device=x.device) >= n  # the second half takes the null condition
    v, _ = model(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, cond), drop)
    v_c, v_u = v.chunk(2)
    return (1 + guidance) * v_c - guidance * v_u
