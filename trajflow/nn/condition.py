"""Embedding of a class index or a condition vector, with a learned null condition for guidance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_count, check_finite


class ConditionEmbedding(nn.Module):
    """``cond -> (N, features)``: a class index (``num_classes``) or a vector (``cond_features``).

    Where ``drop`` is True, or ``cond`` is None, the learned null embedding replaces the condition, so
    one network gives both the conditional and the unconditional model (classifier-free guidance).

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
    def cond_event_dims(self) -> int | None:
        if self.num_classes is not None:
            return 0
        return 1 if self.cond_features else None

    def check(self, cond: Tensor) -> None:
        """Raise a clear error for a condition of the wrong kind, width or range."""
        if self.num_classes is not None:
            if cond.is_floating_point() or cond.dtype == torch.bool:
                raise ValueError(f"cond: expected integer class indices, got dtype {cond.dtype}")
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
                raise ValueError(
                    f"cond: expected class indices in 0..{self.num_classes - 1}, got values in "
                    f"{int(cond.min())}..{int(cond.max())}"
                )
        elif self.cond_features:
            if cond.dim() < 1 or cond.shape[-1] != self.cond_features:
                raise ValueError(
                    f"cond: expected a condition of width {self.cond_features} (shape (*batch, "
                    f"{self.cond_features})), got shape {tuple(cond.shape)}"
                )
            if not cond.is_floating_point():
                raise ValueError(f"cond: expected a float vector condition, got dtype {cond.dtype}")
            check_finite("cond", cond)

    def forward(self, cond: Tensor | None, drop: Tensor | None, n: int) -> Tensor:
        """Embeddings ``(n, features)`` for a flat condition ``(n, ...)`` and drop mask ``(n,)``."""
        null = self.null.expand(n, self.features)
        if cond is None or not self.conditional:
            return null
        e = self.embed(cond)
        if drop is not None:
            e = torch.where(drop[:, None], null.to(e.dtype), e)
        return e
