"""Embedding of a class index or a condition vector, with a learned null condition for guidance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_count
from ..conditioning import CondSpec


class ConditionEmbedding(nn.Module):
    """``cond -> (N, features)``: a class index (``num_classes``) or a vector (``cond_features``).

    Where ``drop`` is True, or ``cond`` is None, the learned null embedding replaces the condition, so
    one network gives both the conditional and the unconditional model (classifier-free guidance). The
    condition is checked where it enters the library (:func:`~trajflow.conditioning.check_cond` with
    :attr:`cond_spec`), not here.

    Arguments:
        features: Output size.
        num_classes: Number of classes for an integer condition, or ``None``.
        cond_features: Width of a vector condition, or 0.
    """

    def __init__(self, features: int, *, num_classes: int | None = None, cond_features: int = 0) -> None:
        super().__init__()
        if num_classes is not None:
            check_count("num_classes", num_classes)
        check_count("cond_features", cond_features, low=0)
        if num_classes is not None and cond_features:
            raise ValueError("num_classes/cond_features: give one kind of condition, not both")
        self.num_classes = num_classes
        self.cond_features = cond_features
        if num_classes is not None:
            self.embed = nn.Embedding(num_classes, features)
        elif cond_features:
            self.embed = nn.Linear(cond_features, features)
        self.null = nn.Parameter(torch.zeros(features))
        self.features = features

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None or self.cond_features > 0

    @property
    def cond_spec(self) -> CondSpec | None:
        """The condition this embedding takes (see :func:`trajflow.conditioning.check_cond`)."""
        return CondSpec.of(num_classes=self.num_classes, features=self.cond_features)

    @property
    def cond_event_dims(self) -> int | None:
        spec = self.cond_spec
        return None if spec is None else spec.event_dims  # type: ignore[return-value]

    def forward(self, cond: Tensor | None, drop: Tensor | None, n: int) -> Tensor:
        """Embeddings ``(n, features)`` for a flat condition ``(n, ...)`` and drop mask ``(n,)``."""
        null = self.null.expand(n, self.features)
        if cond is None or not self.conditional:
            return null
        e = self.embed(cond)
        if drop is not None:
            e = torch.where(drop[:, None], null.to(e.dtype), e)
        return e
