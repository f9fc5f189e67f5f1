r"""A residual-MLP velocity model for vectors."""

from __future__ import annotations

from torch import Tensor, nn

from ..checkpoint import Pretrained
from ..checks import check_times
from ..nn.mlp import MLPTrunk
from .base import VelocityModel

__all__ = ["MLPVelocity"]


class MLPVelocity(MLPTrunk, Pretrained, VelocityModel):
    """A residual-MLP velocity model for vectors (the trunk of :class:`~trajflow.predictors.MLPPredictor`).

    Arguments:
        features: Dimension of the data vectors.
        num_classes, cond_features: An integer condition with this many classes, or a vector condition of
            this width (at most one of them).
        width, depth: The residual MLP's hidden width and number of blocks.
        time_features: Size of the sinusoidal time embedding, even.
        validate_args: Check in :meth:`forward` that the times ``t`` are finite and in [0, 1] (reads their
            values: a GPU synchronisation). Not part of the saved config.

    Example:
        >>> import torch
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
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            features,
            1,
            num_classes=num_classes,
            cond_features=cond_features,
            width=width,
            depth=depth,
            time_features=time_features,
            validate_args=validate_args,
        )
        self.head = nn.Linear(width, features)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)`` for ``x_t`` ``(N, features)`` at times ``t`` ``(N,)``; with ``validate_args``, times
        outside [0, 1] or NaN are refused with a ``ValueError`` naming ``t``."""
        if self.validate_args:
            check_times("t", t)
        h = self._hidden(x_t, (t,), cond, drop_cond)
        return self.head(h), h
