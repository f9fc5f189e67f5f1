"""Sinusoidal embeddings of continuous times, and embeddings of a class index or condition vector with a learned
null condition for guidance."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import check_count
from ..conditioning import CondSpec


class SinusoidalEmbedding(nn.Module):
    r"""Embeds a time :math:`t \in [0, 1]` as ``[cos(w t'), sin(w t')]`` with :math:`t' = 1000 t`.

    The frequencies are geometric between 1 and ``1 / max_period`` (Vaswani et al., 2017), as in
    diffusion models. The module has no parameters.

    Arguments:
        features: The embedding size (even).
        max_period: The longest period.

    Example:
        >>> SinusoidalEmbedding(8)(torch.rand(5)).shape
        torch.Size([5, 8])
    """

    def __init__(self, features: int, max_period: float = 10_000.0) -> None:
        super().__init__()
        if features < 2 or features % 2:
            raise ValueError(f"features: expected an even integer >= 2, got {features}")
        half = features // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.features = features

    def forward(self, t: Tensor) -> Tensor:
        """``t`` of shape ``batch`` -> embedding of shape ``(*batch, features)``, in float32."""
        angles = 1000.0 * t.float()[..., None] * self.freqs
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


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
