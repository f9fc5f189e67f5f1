r"""An NTM initialised from a pretrained flow-matching model: the velocity model wrapped as the predictor
(:class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor`) and a transporter that is exactly the
identity at initialisation (method.md 3.4, steps 1-2)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..model import NTM
from ..predictors.from_velocity import FlowMatchingPredictor
from ..transporters.base import Transporter
from ..transporters.transformer import TransformerTransporter, TransformerTransporterConfig
from ..transporters.zuko import ZukoTransporter

__all__ = [
    "frozen_copy",
    "FlowMatchingInit",
    "init_from_flow_matching",
    "zero_init_zuko_",
    "identity_transporter",
    "check_identity",
]


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


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off, in eval mode (the mean-alignment reference)."""
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    return ref.eval()


class FlowMatchingInit(NamedTuple):
    """What :func:`init_from_flow_matching` returns."""

    model: NTM
    """The NTM: identity transporter + :class:`FlowMatchingPredictor` around the (trainable) velocity model."""
    reference: nn.Module
    """A frozen deep copy of the velocity model, for :class:`MeanAlignmentLoss`."""


def init_from_flow_matching(
    velocity: nn.Module,
    transporter: Transporter | None = None,
    *,
    atol: float = 1e-6,
    transporter_kwargs: dict[str, Any] | None = None,
    **predictor_kwargs: Any,
) -> FlowMatchingInit:
    r"""Build an NTM initialised from a flow-matching velocity model (NTM §3.3).

    Arguments:
        velocity: The pretrained velocity model (see :class:`FlowMatchingPredictor`); it becomes the
            trainable backbone of the predictor. A frozen deep copy is made first (the reference).
        transporter: A transporter that is the identity at initialisation, on the velocity model's
            ``event_shape``; ``None`` builds one with :func:`identity_transporter` from
            ``transporter_kwargs``. It is checked with :func:`check_identity` (tolerance ``atol``).
        transporter_kwargs: Keyword arguments of :func:`identity_transporter`.
        **predictor_kwargs: Keyword arguments of :class:`FlowMatchingPredictor` (``c_min``, ``delta_mean``,
            ``time_features``, ...).

    Raises:
        ValueError: The transporter is not the identity, or its event shape differs from the velocity
            model's (both named).

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> model, reference = init_from_flow_matching(MLPVelocity(features=2, width=32))
        >>> model.sample((5,), steps=4).shape
        torch.Size([5, 2])
    """
    reference = frozen_copy(velocity)
    predictor = FlowMatchingPredictor(velocity, **predictor_kwargs)
    transporter = _transporter(transporter, transporter_kwargs, predictor.event_shape)
    check_identity(transporter, atol=atol)
    device = next((p.device for p in velocity.parameters()), None)
    if device is not None:
        transporter = transporter.to(device)
    return FlowMatchingInit(NTM(transporter, predictor), reference)


def _transporter(
    transporter: Transporter | None, kwargs: dict[str, Any] | None, event_shape: torch.Size
) -> Transporter:
    """The given transporter, checked, or a new :func:`identity_transporter`."""
    if transporter is None:
        return identity_transporter(event_shape, **(kwargs or {}))
    if kwargs:
        raise ValueError("transporter_kwargs: only used when transporter is None")
    if not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter or None, got {type(transporter).__name__}")
    if torch.Size(transporter.event_shape) != event_shape:
        # Checked before check_identity, whose random probe would fail on the shape with a less clear error.
        raise ValueError(
            f"transporter: expected the velocity model's event_shape {tuple(event_shape)}, got a "
            f"transporter on event_shape {tuple(transporter.event_shape)}"
        )
    return transporter
