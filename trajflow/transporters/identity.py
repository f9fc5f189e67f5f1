"""The identity transporter: NTM with it is the Gaussian-step model (the "Gaussian bottleneck")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..numerics import upcast
from .base import Transporter


class IdentityTransporter(Transporter):
    r""":math:`f_T(x, t) = x`. With it every reverse step is a diagonal Gaussian (NTM App. A.2).

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

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[: x.dim() - self.event_dim]
        return x, upcast(x.new_zeros(batch))

    def inverse(self, u: Tensor, t: Tensor) -> Tensor:
        return u
