r"""A transporter used alone as a density model: one normalizing flow at a fixed time (the TarFlow baseline).

An NTM's transporter :math:`f(x, t)`, frozen at one time ``t`` over a standard normal base, is a plain flow

.. math:: \log p(y) = \log \mathcal{N}(f(y, t); 0, I) + \log \Big|\det \frac{\partial f(y, t)}{\partial y}\Big|:

with a :class:`~trajflow.transporters.transformer.TransformerTransporter`, TarFlow (Zhai et al., 2025) with a
constant time embedding. Its bits/dim is exact up to dequantisation (:meth:`SingleFlow.bits_per_dim`);
:class:`SingleFlowNLL` is its loss, and :func:`matched_single_flow` sizes a stack to another model's
parameter count.

References:
    | Normalizing Flows are Capable Generative Models (TarFlow; Zhai et al., 2025).
    | https://arxiv.org/abs/2412.06329

Example:
    >>> from trajflow.transporters import ZukoTransporter
    >>> flow = SingleFlow(ZukoTransporter(features=2))
    >>> y = flow.sample((5,))
    >>> y.shape, flow.log_prob(y).shape
    (torch.Size([5, 2]), torch.Size([5]))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_event_shape
from ..likelihood import flow_bits_per_dim
from ..nn.parameters import count_parameters
from ..numerics import upcast
from ..transporters.base import Transporter
from ..transporters.transformer import TransformerTransporter, TransformerTransporterConfig

__all__ = ["SingleFlow", "SingleFlowNLL", "matched_single_flow"]

_LOG_2PI = math.log(2 * math.pi)


class SingleFlow(nn.Module):
    r"""The flow :math:`y \mapsto f(y, t)` of a transporter at a fixed time, over a :math:`\mathcal{N}(0, I)` base.

    Arguments:
        transporter: An unconditional transporter (its :attr:`~Transporter.event_shape` is the flow's).
        t: The time at which it is frozen, in [0, 1] (the benchmarks use 0: the data end).

    ``forward(y)`` is :meth:`log_prob`.
    """

    def __init__(self, transporter: Transporter, t: float = 0.0) -> None:
        super().__init__()
        if not isinstance(transporter, Transporter):
            raise ValueError(f"transporter: expected a trajflow Transporter, got {type(transporter).__name__}")
        if transporter.is_conditional:
            raise ValueError("transporter: expected an unconditional transporter (a single flow has no condition)")
        if not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
            raise ValueError(f"t: expected a time in [0, 1], got {t!r}")
        self.transporter = transporter
        self.t = float(t)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size(self.transporter.event_shape)

    def _times(self, x: Tensor) -> Tensor:
        """The constant time, one per data point: shape ``batch`` of ``x`` ``(*batch, *event)``."""
        batch = x.shape[: x.dim() - len(self.event_shape)]
        return torch.full(batch, self.t, device=x.device)

    def log_prob(self, y: Tensor) -> Tensor:
        r"""Exact :math:`\log p(y)` in nats, summed over the event: ``y`` ``(*batch, *event)`` -> ``batch``.

        Computed in float32 at least (the log-determinant is, too), whatever the autocast dtype.
        """
        check_event_shape("y", y, self.event_shape, "the transporter's event shape")
        u, ladj = self.transporter(y, self._times(y))
        u = upcast(u).flatten(u.dim() - len(self.event_shape))  # (*batch, D)
        return (-0.5 * (u.square() + _LOG_2PI)).sum(-1) + upcast(ladj)

    def forward(self, y: Tensor) -> Tensor:
        return self.log_prob(y)

    @torch.no_grad()
    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws ``(*sample_shape, *event)``: :math:`f^{-1}(u, t)` of :math:`u \\sim \\mathcal{N}(0, I)`."""
        device = next(iter(self.parameters()), torch.empty(0)).device
        u = torch.randn(*sample_shape, *self.event_shape, device=device, generator=generator)
        return self.transporter.inverse(u, self._times(u))

    @torch.no_grad()
    def bits_per_dim(
        self,
        x_int: Tensor,
        levels: int,
        *,
        num_samples: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
    ) -> Tensor:
        """Dequantised bits/dim of integer data (see :func:`trajflow.likelihood.flow_bits_per_dim`).

        Arguments:
            x_int: Integer data ``(N, *event)`` in ``[0, levels - 1]`` (e.g. uint8 images).
            levels: Values per dimension :math:`K`.
            num_samples: Dequantisation draws averaged per data point.
            batch_size: Data points per network evaluation (``None``: all at once), to bound memory.
            generator: The random generator of the dequantisation noise.
            data_range: The range the flow was trained on.

        Returns:
            Bits/dim per data point, shape ``(N,)``, float64.
        """
        check_event_shape("x_int", x_int, self.event_shape, "the flow's event shape")
        if x_int.dim() != len(self.event_shape) + 1:
            raise ValueError(f"x_int: expected shape (N, *{tuple(self.event_shape)}), got {tuple(x_int.shape)}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        chunks = x_int.split(batch_size or max(1, x_int.shape[0]))
        options = dict(event_dim=len(self.event_shape), num_samples=num_samples, generator=generator)
        return torch.cat(
            [flow_bits_per_dim(self.log_prob, x, levels, data_range=data_range, **options) for x in chunks]
        )


@dataclass
class SingleFlowNLL:
    r"""Maximum-likelihood loss of a :class:`SingleFlow`: :math:`-\log p(y) / D` averaged over the batch.

    ``y`` is continuous data ``(N, *event)`` (images dequantised: :func:`trajflow.likelihood.dequantize`).
    ``generator`` is accepted (and unused) so that it is called like :class:`~trajflow.TrajectoryNLL`.

    Example:
        >>> from trajflow.transporters import ZukoTransporter
        >>> flow = SingleFlow(ZukoTransporter(features=2))
        >>> SingleFlowNLL()(flow, torch.randn(8, 2)).shape
        torch.Size([])
    """

    loss_name: str = "nll_per_dim"

    def __call__(self, model: SingleFlow, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        dims = math.prod(model.event_shape)
        return -model.log_prob(y).mean() / dims


def matched_single_flow(
    config: TransformerTransporterConfig,
    target: int,
    *,
    blocks: Iterable[int] = range(2, 17),
    layers_per_block: Iterable[int] = range(1, 9),
    tolerance: float = 0.1,
) -> TransformerTransporterConfig:
    """The ``config`` with the ``(blocks, layers_per_block)`` whose parameter count is closest to ``target``.

    Everything else stays ``config``'s; ties go to more blocks (TarFlow prefers many shallow blocks).
    Candidates are counted on the meta device (no memory).

    Arguments:
        config: The stack to deepen or shorten.
        target: The parameter count to match (e.g. an NTM's, :func:`~trajflow.nn.count_parameters`).
        blocks, layers_per_block: The candidate depths.
        tolerance: The largest relative miss accepted.

    Raises:
        ValueError: No candidate is within ``tolerance`` of ``target`` (naming the closest).

    Example:
        >>> base = TransformerTransporterConfig((1, 8, 8), patch_size=2, width=32, heads=2)
        >>> matched = matched_single_flow(base, 60_000)
        >>> abs(count_parameters(TransformerTransporter(matched)) - 60_000) / 60_000 < 0.1
        True
    """
    _check_match_arguments(config, target, tolerance)
    miss, _, candidate, n = _closest_depth(config, target, blocks, layers_per_block)
    if miss > tolerance:
        raise ValueError(
            f"target: no stack within {tolerance:.0%} of {target:,} parameters; the closest, {candidate.blocks} "
            f"blocks x {candidate.layers_per_block} layers, has {n:,} ({miss:.1%} off)"
        )
    return candidate


def _check_match_arguments(config: object, target: object, tolerance: float) -> None:
    if not isinstance(config, TransformerTransporterConfig):
        raise ValueError(f"config: expected a TransformerTransporterConfig, got {type(config).__name__}")
    if not isinstance(target, int) or isinstance(target, bool) or target < 1:
        raise ValueError(f"target: expected a positive number of parameters, got {target!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: expected a non-negative fraction, got {tolerance!r}")


def _closest_depth(
    config: TransformerTransporterConfig, target: int, blocks: Iterable[int], layers_per_block: Iterable[int]
) -> tuple[float, int, TransformerTransporterConfig, int]:
    """``(relative miss, -blocks, candidate, parameters)`` of the candidate closest to ``target`` (ties: more
    blocks), counted on the meta device."""
    rows = []
    for b in blocks:
        for layers in layers_per_block:
            candidate = dataclasses.replace(config, blocks=b, layers_per_block=layers)
            with torch.device("meta"):
                n = count_parameters(TransformerTransporter(candidate))
            rows.append((abs(n - target) / target, -b, candidate, n))
    if not rows:
        raise ValueError("blocks, layers_per_block: expected at least one candidate depth each")
    return min(rows, key=lambda row: row[:2])
