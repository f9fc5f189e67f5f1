"""The identity transporter: NTM with it is the Gaussian-step model (the "Gaussian bottleneck")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import Pretrained
from ..conditioning import Condition
from ..numerics import upcast
from .base import Transporter


class IdentityTransporter(Pretrained, Transporter):
    r""":math:`f_T(x, t) = x`. With it every reverse step is a diagonal Gaussian (NTM App. A.2).

    It ignores any condition (``cond``, ``drop_cond``): the identity does not depend on it.

    Arguments:
        event_shape: The shape of one data point, or an int for vectors.

    Example:
        >>> f = IdentityTransporter(2)
        >>> u, ladj = f(torch.ones(3, 2), torch.zeros(3))
        >>> ladj
        tensor([0., 0., 0.])
    """

    def __init__(self, event_shape: int | Sequence[int]) -> None:
        super().__init__()
        if isinstance(event_shape, int):
            event_shape = (event_shape,)
        self.event_shape = torch.Size(event_shape)

    def config_dict(self) -> dict[str, Any]:
        """``{"event_shape": [...]}``: all :meth:`from_config` needs (the map has no parameters)."""
        return {"event_shape": list(self.event_shape)}

    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x, 0)``; ``cond`` and ``drop_cond`` are ignored."""
        batch = x.shape[: x.dim() - self.event_dim]
        return x, upcast(x.new_zeros(batch))

    def inverse(self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """``u``; ``cond`` and ``drop_cond`` are ignored."""
        return u
