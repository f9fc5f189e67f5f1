"""Sinusoidal embeddings of continuous times."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
