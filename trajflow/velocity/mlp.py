r"""A residual-MLP velocity model for vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained
from ..checks import check_time_features, check_times
from ..nn.condition import ConditionEmbedding
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.mlp import ResidualMLP
from .base import VelocityModel

__all__ = ["MLPVelocity"]


class MLPVelocity(Pretrained, VelocityModel):
    """A residual-MLP velocity model for vectors (the same backbone as :class:`~trajflow.predictors.MLPPredictor`).

    Arguments:
        features: Dimension of the data vectors.
        num_classes, cond_features: An integer condition with this many classes, or a vector condition of
            this width (at most one of them).
        width, depth: The residual MLP's hidden width and number of blocks.
        time_features: Size of the sinusoidal time embedding, even.
        validate_args: Check in :meth:`forward` that the times ``t`` are finite and in [0, 1] (reads their
            values: a GPU synchronisation). Not part of the saved config.

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
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"features: expected a positive integer, got {features!r}")
        check_time_features("time_features", time_features)
        self.validate_args = bool(validate_args)
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        self.condition = ConditionEmbedding(time_features, num_classes=num_classes, cond_features=cond_features)
        self.cond_spec = self.condition.cond_spec
        self.cond_event_dims = self.condition.cond_event_dims
        self.backbone = ResidualMLP(features, 2 * time_features, width, depth)
        self.head = nn.Linear(width, features)
        self.width = width
        # The constructor's arguments, to rebuild it (config_dict / from_config).
        self.num_classes, self.cond_features = num_classes, cond_features
        self.depth, self.time_features = depth, time_features

    def config_dict(self) -> dict[str, Any]:
        """The constructor's arguments (see :meth:`~trajflow.checkpoint.Pretrained.save_pretrained`)."""
        return {
            "features": self.event_shape[0],
            "num_classes": self.num_classes,
            "cond_features": self.cond_features,
            "width": self.width,
            "depth": self.depth,
            "time_features": self.time_features,
        }

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)`` for ``x_t`` ``(N, features)`` at times ``t`` ``(N,)``; with ``validate_args``, times
        outside [0, 1] or NaN are refused with a ``ValueError`` naming ``t``."""
        if self.validate_args:
            check_times("t", t)
        c = torch.cat([self.time(t), self.condition(cond, drop_cond, x_t.shape[0])], dim=-1)
        h = self.backbone(x_t, c.to(x_t.dtype))
        return self.head(h), h
