r"""Transporters that are exactly the identity at initialisation, and the check that one is (method.md 3.4,
step 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..transporters.base import Transporter
from ..transporters.transformer import TransformerTransporter, TransformerTransporterConfig
from ..transporters.zuko import ZukoTransporter

__all__ = ["zero_init_zuko_", "identity_transporter", "check_identity"]


def zero_init_zuko_(transporter: ZukoTransporter) -> ZukoTransporter:
    r"""Zero the last layer of every hyper-network of a zuko transporter, in place; returns it.

    For ``preset="maf"`` (affine autoregressive steps) this makes the transporter *exactly* the identity:
    each step computes ``x * exp(0) + 0``, with a zero log-determinant. For ``preset="nsf"`` it is the
    identity only up to float rounding (about 1e-7: a spline with uniform bins and unit derivatives).
    Gradients still reach every layer once the last one moves away from zero.
    """
    if not isinstance(transporter, ZukoTransporter):
        raise ValueError(f"transporter: expected a ZukoTransporter, got {type(transporter).__name__}")
    found = sum(_zero_last_linear(getattr(m, "hyper", None)) for m in transporter.flow.modules())
    if not found:
        raise ValueError(
            "transporter: found no zuko hyper-network to zero (expected MaskedAutoregressiveTransform "
            "steps, e.g. ZukoTransporter(preset='maf'))"
        )
    return transporter


def _zero_last_linear(hyper: object) -> bool:
    """Zero the last :class:`~torch.nn.Linear` of a hyper-network; whether there was one."""
    linears = [m for m in hyper.modules() if isinstance(m, nn.Linear)] if isinstance(hyper, nn.Module) else []
    if linears:
        nn.init.zeros_(linears[-1].weight)
        if linears[-1].bias is not None:
            nn.init.zeros_(linears[-1].bias)
    return bool(linears)


def identity_transporter(event_shape: int | Sequence[int], **kwargs: Any) -> Transporter:
    r"""A learnable transporter that is exactly the identity at initialisation.

    Arguments:
        event_shape: ``features`` (or ``(features,)``) for vectors, ``(C, H, W)`` for images.
        **kwargs: For vectors, keyword arguments of :class:`~trajflow.transporters.ZukoTransporter`
            (``transforms``, ``hidden_features``, ...; the preset is MAF); for images, fields of
            :class:`~trajflow.transporters.transformer.TransformerTransporterConfig` (``patch_size``,
            ``width``, ``layers_per_block``, ...).

    Example:
        >>> f = identity_transporter(2)
        >>> x, t = torch.randn(3, 2), torch.rand(3)
        >>> u, ladj = f(x, t)
        >>> torch.equal(u, x), bool((ladj == 0).all())
        (True, True)
    """
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    if len(shape) == 1:
        kwargs.setdefault("preset", "maf")
        if kwargs["preset"] != "maf":
            raise ValueError(f"preset: only 'maf' starts as the exact identity, got {kwargs['preset']!r}")
        return zero_init_zuko_(ZukoTransporter(shape[0], **kwargs))
    if len(shape) == 3:
        return TransformerTransporter(TransformerTransporterConfig(shape, **kwargs))  # zero heads: identity
    raise ValueError(f"event_shape: expected (features,) or (C, H, W), got {shape}")


@torch.no_grad()
def check_identity(
    transporter: Transporter,
    *,
    atol: float = 0.0,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> None:
    r"""Raise a :class:`ValueError` unless ``transporter(x, t) == (x, 0)`` within ``atol`` on random inputs.

    Checks ``num_samples`` points :math:`x \sim \mathcal{N}(0, 4 I)` at times spread over [0, 1] (a
    conditional transporter at the null context).
    """
    if not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter, got {type(transporter).__name__}")
    device = next((p.device for p in transporter.parameters()), torch.device("cpu"))
    x = 2.0 * torch.randn(num_samples, *transporter.event_shape, generator=generator).to(device)
    t = torch.linspace(0.0, 0.99, num_samples, device=device)
    # cond=None: a conditional transporter at the null context (its zero-initialised condition projections
    # make every context give the same map at initialisation).
    u, ladj = transporter(x, t, None, None)
    err, lerr = float((u - x).abs().max()), float(ladj.abs().max())
    if err > atol or lerr > atol:
        raise ValueError(
            f"transporter: expected the identity at initialisation (within atol={atol:g}), got "
            f"max |f(x, t) - x| = {err:.3g} and max |log det| = {lerr:.3g}; use identity_transporter(...) or "
            "zero_init_zuko_(...) (a default ZukoTransporter is not the identity)"
        )
