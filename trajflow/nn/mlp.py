"""A residual MLP over a feature vector plus a conditioning vector (times, class, ...), and the trunk of the
vector models built on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_count, check_time_features
from .embeddings import ConditionEmbedding, SinusoidalEmbedding


class ResidualBlock(nn.Module):
    """Pre-norm residual block ``h + W2 act(W1 norm(h) + c)``; ``c`` adds the conditioning."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.cond = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.cond(c)))


class ResidualMLP(nn.Module):
    """``(x, c) -> h``: an input projection, ``depth`` residual blocks conditioned on ``c``, a final norm.

    Arguments:
        in_features: Size of ``x``.
        cond_features: Size of ``c`` (the concatenated time / class embeddings).
        width: Hidden width.
        depth: Number of residual blocks.
    """

    def __init__(self, in_features: int, cond_features: int, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        check_count("width", width)
        check_count("depth", depth, low=0)
        self.proj_in = nn.Linear(in_features, width)
        self.proj_cond = nn.Sequential(nn.Linear(cond_features, width), nn.SiLU())
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x`` of shape ``(N, in_features)``, ``c`` of shape ``(N, cond_features)`` -> ``(N, width)``."""
        c = self.proj_cond(c)
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, c)
        return self.norm(h)


def zero_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An :class:`~torch.nn.Linear` with zero weight (and bias): a head that outputs 0 at initialisation."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class MLPTrunk(nn.Module):
    """The trunk of :class:`~trajflow.predictors.MLPPredictor` and :class:`~trajflow.velocity.MLPVelocity`:
    sinusoidal embeddings of ``num_times`` times and a condition embedding feed a :class:`ResidualMLP` over
    the data vector. Subclasses add a head; the constructor's arguments are theirs (see those classes)."""

    def __init__(
        self,
        features: int,
        num_times: int,
        *,
        num_classes: int | None,
        cond_features: int,
        width: int,
        depth: int,
        time_features: int,
        validate_args: bool,
    ) -> None:
        super().__init__()
        check_count("features", features)
        check_time_features("time_features", time_features)
        self.validate_args = bool(validate_args)
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        self.condition = ConditionEmbedding(time_features, num_classes=num_classes, cond_features=cond_features)
        self.cond_spec = self.condition.cond_spec
        self.cond_event_dims = self.condition.cond_event_dims
        self.backbone = ResidualMLP(features, (num_times + 1) * time_features, width, depth)
        self.num_classes, self.cond_features = num_classes, cond_features
        self.width, self.depth, self.time_features = width, depth, time_features

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

    def _hidden(self, x: Tensor, times: tuple[Tensor, ...], cond: Tensor | None, drop_cond: Tensor | None) -> Tensor:
        """The backbone's hidden state ``(N, width)`` of ``x`` ``(N, features)`` at ``times`` (each ``(N,)``)."""
        c = torch.cat([*(self.time(t) for t in times), self.condition(cond, drop_cond, x.shape[0])], dim=-1)
        return self.backbone(x, c.to(x.dtype))
