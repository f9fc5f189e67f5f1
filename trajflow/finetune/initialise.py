r"""An NTM initialised from a pretrained flow-matching model: the velocity model wrapped as the predictor
(:class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor`) and an identity transporter."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import nn

from ..model import NTM
from ..predictors.from_velocity import FlowMatchingPredictor
from ..transporters.base import Transporter
from .identity import check_identity, identity_transporter

__all__ = ["frozen_copy", "FlowMatchingInit", "init_from_flow_matching"]


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
