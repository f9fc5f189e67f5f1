"""A residual MLP over a feature vector plus a conditioning vector (times, class, ...)."""

from __future__ import annotations

from torch import Tensor, nn

from ..checks import check_count


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
