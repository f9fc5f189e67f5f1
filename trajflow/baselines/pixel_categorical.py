r"""Independent per-pixel categoricals: the no-training floor of a bits/dim comparison.

Each dimension :math:`d` of integer data :math:`x \in \{0, \dots, K - 1\}^D` gets its own histogram of the
training set, smoothed by adding :math:`\alpha` to every count,

.. math:: \hat P_d(k) = \frac{n_{d,k} + \alpha}{N + K \alpha}, \qquad
          \text{bpd}(x) = -\frac{1}{D} \sum_d \log_2 \hat P_d(x_d).

It is a discrete model, so its bits/dim is exact (no dequantisation, no bound) and directly comparable with
the dequantised bits/dim of continuous models, which upper-bound their own discrete NLL
(:mod:`trajflow.likelihood`). A likelihood model above this number has learned less than the per-pixel
histograms.

Example:
    >>> train = torch.tensor([[[[0, 1]]], [[[0, 2]]]])  # two 1x1x2 images, 3 levels
    >>> model = PixelCategorical.fit(train, levels=3, alpha=0.5)
    >>> model.probs[0, 0, 0]  # (2 + 0.5, 0 + 0.5, 0 + 0.5) / 3.5
    tensor([0.7143, 0.1429, 0.1429], dtype=torch.float64)
    >>> model.bits_per_dim(train).shape
    torch.Size([2])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..likelihood import check_discrete, check_levels

__all__ = ["PixelCategorical", "pixel_categorical_bits_per_dim"]


class PixelCategorical(Distribution):
    r"""Independent categoricals over ``levels`` values, one per dimension of the event.

    Arguments:
        probs: ``(*event, levels)``: the probabilities of each value in each dimension (each last-axis row
            sums to 1).
        validate_args: torch.distributions' argument and sample checks.

    ``log_prob`` of integer data ``(*sample, *event)`` sums the per-dimension log-probabilities over the event.
    """

    arg_constraints = {"probs": constraints.simplex}

    def __init__(self, probs: Tensor, validate_args: bool | None = None) -> None:
        if not isinstance(probs, Tensor) or probs.dim() < 2 or not probs.is_floating_point():
            got = f"shape {tuple(probs.shape)}" if isinstance(probs, Tensor) else type(probs).__name__
            raise ValueError(f"probs: expected a floating tensor (*event, levels), event dims >= 1, got {got}")
        self.probs = probs
        super().__init__(torch.Size(), probs.shape[:-1], validate_args=validate_args)

    @classmethod
    def fit(cls, images: Tensor, levels: int, alpha: float = 0.5) -> PixelCategorical:
        """The add-``alpha`` smoothed histograms of integer data ``(N, *event)`` in ``[0, levels - 1]``.

        ``alpha = 0.5`` is the Krichevsky-Trofimov estimator; it must be positive, or a value never seen in
        training would get probability 0 (infinite bits) on test data.
        """
        levels = check_levels(levels)
        check_discrete("images", images, levels)
        if images.dim() < 2 or images.shape[0] < 1:
            raise ValueError(f"images: expected integer data (N, *event) with N >= 1, got shape {tuple(images.shape)}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha: expected a positive smoothing count, got {alpha!r}")
        x = images.flatten(1).long()  # (N, D)
        counts = torch.full((x.shape[1], levels), float(alpha), dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, x.T, torch.ones(x.T.shape, dtype=torch.float64, device=x.device))
        probs = counts / counts.sum(-1, keepdim=True)  # (D, levels)
        return cls(probs.reshape(*images.shape[1:], levels))

    @property
    def levels(self) -> int:
        return self.probs.shape[-1]

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.integer_interval(0, self.levels - 1)

    @property
    def num_free_parameters(self) -> int:
        """``D * (levels - 1)``: the free probabilities (each histogram sums to 1)."""
        return math.prod(self.event_shape) * (self.levels - 1)

    def log_prob(self, value: Tensor) -> Tensor:
        """``(*sample, *event)`` integers -> ``sample`` log-probabilities (nats, float64 for float64 probs)."""
        if self._validate_args:
            self._validate_sample(value)
        n = len(self.event_shape)
        sample = value.shape[: value.dim() - n]
        flat = value.reshape(-1, math.prod(self.event_shape)).long()  # (S, D)
        log_p = self.probs.reshape(flat.shape[1], self.levels).log()  # (D, levels)
        # Advanced indexing picks log_p[d, x_d] for every (s, d): (S, D) in memory, never (S, D, levels).
        picked = log_p[torch.arange(flat.shape[1], device=flat.device), flat]
        return picked.sum(-1).reshape(sample)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Integer draws ``(*sample_shape, *event)`` (int64) from the global torch RNG."""
        n = math.prod(sample_shape)
        flat = self.probs.reshape(-1, self.levels)  # (D, levels)
        draws = torch.multinomial(flat, n, replacement=True) if n else flat.new_zeros(flat.shape[0], 0).long()
        return draws.T.reshape(*sample_shape, *self.event_shape)

    def bits_per_dim(self, value: Tensor) -> Tensor:
        """Exact bits/dim of integer data ``(*sample, *event)``: :math:`-\\log_2 P(x) / D`, shape ``sample``."""
        return -self.log_prob(value) / (math.prod(self.event_shape) * math.log(2.0))


def pixel_categorical_bits_per_dim(train: Tensor, test: Tensor, levels: int, alpha: float = 0.5) -> Tensor:
    """Exact bits/dim of each ``test`` point under the per-pixel histograms of ``train`` (add-``alpha``).

    Arguments:
        train, test: Integer data ``(N, *event)`` and ``(M, *event)`` in ``[0, levels - 1]``.
        levels: Values per dimension.
        alpha: The smoothing count (see :meth:`PixelCategorical.fit`).

    Returns:
        ``(M,)`` bits/dim, float64.

    Example:
        >>> x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
        >>> pixel_categorical_bits_per_dim(x, x, levels=2).tolist()  # -log2(4.5 / 5) per pixel
        [0.15200309344504997, 0.15200309344504997, 0.15200309344504997, 0.15200309344504997]
    """
    model = PixelCategorical.fit(train, levels, alpha)
    check_discrete("test", test, model.levels)
    if tuple(test.shape[1:]) != tuple(model.event_shape):
        raise ValueError(f"test: expected shape (M, *{tuple(model.event_shape)}) like train, got {tuple(test.shape)}")
    return model.bits_per_dim(test.to(model.probs.device))
