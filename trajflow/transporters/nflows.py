r"""Transporters built from nflows (0.14) transforms: :class:`torch.nn.Module`\ s with ``forward(inputs,
context) -> (outputs, logabsdet)`` in the data-to-noise direction, whose contexts must have the inputs' leading
dim (the adapter flattens both). ``NaiveLinear`` (its inverse calls the removed ``torch.solve``) and
``BatchNorm`` (batch-dependent, inverts only in eval mode) are refused at construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_count
from ..conditioning import Condition
from ..nn.embeddings import SinusoidalEmbedding
from ..numerics import upcast
from .base import Transporter

__all__ = ["NflowsTransporter"]


def _preset(name: str, features: int, context: int, transforms: int, hidden: int, bins: int) -> nn.Module:
    from nflows.transforms import CompositeTransform, ReversePermutation
    from nflows.transforms.autoregressive import (
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
    )

    if name not in ("maf", "rqs"):
        raise ValueError(f"preset: expected 'maf' or 'rqs', got {name!r}")
    layers: list[nn.Module] = []
    for i in range(transforms):
        if i:
            layers.append(ReversePermutation(features))
        if name == "maf":
            layers.append(
                MaskedAffineAutoregressiveTransform(features, hidden_features=hidden, context_features=context)
            )
        else:
            layers.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    features,
                    hidden_features=hidden,
                    context_features=context,
                    num_bins=bins,
                    tails="linear",
                    tail_bound=5.0,
                )
            )
    return CompositeTransform(layers)


def _check_invertible(transform: nn.Module, naive_linear: type, batch_norm: type) -> None:
    """Refuse the nflows layers that cannot serve in a transporter (``NaiveLinear``, ``BatchNorm``)."""
    for m in transform.modules():
        if isinstance(m, naive_linear):
            raise ValueError(
                "transform: nflows 0.14 NaiveLinear cannot be inverted on current torch (it calls the "
                "removed torch.solve); use LULinear instead"
            )
        if isinstance(m, batch_norm):
            raise ValueError(
                "transform: nflows BatchNorm depends on the batch and inverts only in eval mode; "
                "it cannot serve as a transporter"
            )


class NflowsTransporter(Transporter):
    r"""A transporter :math:`f_T(x, t)` made of an nflows transform with a time embedding as context.

    Arguments:
        features: Dimension of the data vectors.
        transform: An nflows ``Transform`` built with ``context_features=time_features``, or ``None``
            for a preset.
        preset: ``"maf"`` (masked affine autoregressive) or ``"rqs"`` (rational-quadratic splines, linear
            tails on [-5, 5]).
        transforms: Number of autoregressive transforms of the preset (reversed in between).
        hidden_features: Hidden width of the preset's MADE networks.
        time_features: Size of the sinusoidal time embedding.
        bins: Spline bins of the ``"rqs"`` preset.

    It is unconditional: ``cond`` and ``drop_cond`` are ignored.

    Example:
        >>> f = NflowsTransporter(features=2, preset="maf")
        >>> x, t = torch.randn(4, 2), torch.rand(4)
        >>> u, ladj = f(x, t)
        >>> torch.allclose(f.inverse(u, t), x, atol=1e-4)
        True
    """

    def __init__(
        self,
        features: int,
        transform: nn.Module | None = None,
        *,
        preset: str = "rqs",
        transforms: int = 2,
        hidden_features: int = 64,
        time_features: int = 16,
        bins: int = 8,
    ) -> None:
        super().__init__()
        try:
            from nflows.transforms import Transform as NflowsTransform
            from nflows.transforms.linear import NaiveLinear
            from nflows.transforms.normalization import BatchNorm
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("NflowsTransporter needs nflows: pip install 'trajflow[nflows]'") from e
        check_count("features", features)
        if transform is None:
            transform = _preset(preset, features, time_features, transforms, hidden_features, bins)
        if not isinstance(transform, NflowsTransform):
            raise ValueError(f"transform: expected an nflows Transform, got {type(transform).__name__}")
        _check_invertible(transform, NaiveLinear, BatchNorm)
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        self.nflows_transform = transform

    def _flat(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` as ``(N, features)`` and the time context ``(N, time_features)`` (nflows wants both flat)."""
        return x.reshape(-1, x.shape[-1]), self.time(t.reshape(-1)).to(x.dtype)

    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        flat, ctx = self._flat(x, t)
        u, ladj = self.nflows_transform(flat, context=ctx)
        return u.reshape(x.shape), upcast(ladj).reshape(x.shape[:-1])

    def inverse(self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        flat, ctx = self._flat(u, t)
        return self.nflows_transform.inverse(flat, context=ctx)[0].reshape(u.shape)
