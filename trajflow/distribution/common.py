"""What the trajectory distribution's modules share: the standard normal log-density, event sums, and the
checks of its parts and of sample shapes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..numerics import upcast
from ..predictors.base import Predictor
from ..transporters.base import Transporter

__all__ = ["check_compatible"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _std_normal_log_prob(z: Tensor, event_dim: int) -> Tensor:
    """``log N(z; 0, I)`` summed over the ``event_dim`` rightmost dims, in float32."""
    z = upcast(z)
    return (-0.5 * z.square() - _HALF_LOG_2PI).flatten(z.dim() - event_dim).sum(-1)


def _sum_event(x: Tensor, event_dim: int) -> Tensor:
    return x.flatten(x.dim() - event_dim).sum(-1) if event_dim else x


def check_compatible(transporter: Transporter, predictor: Predictor) -> None:
    """Raise unless the transporter and the predictor are trajflow modules with the same event shape."""
    if not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter, got {type(transporter).__name__}")
    if not isinstance(predictor, Predictor):
        raise ValueError(f"predictor: expected a trajflow Predictor, got {type(predictor).__name__}")
    if torch.Size(transporter.event_shape) != torch.Size(predictor.event_shape):
        raise ValueError(
            f"transporter/predictor: their event shapes disagree: the transporter maps "
            f"{tuple(transporter.event_shape)} but the predictor expects {tuple(predictor.event_shape)}"
        )
    if transporter.is_conditional and transporter.cond_event_dims != predictor.cond_event_dims:
        raise ValueError(
            f"transporter/predictor: the transporter is conditional with cond_event_dims "
            f"{transporter.cond_event_dims!r} but the predictor takes {predictor.cond_event_dims!r}; both must "
            "take the same kind of condition (class indices: 0; text (features, mask): (2, 1))"
        )


def _module_device(*modules: torch.nn.Module) -> torch.device | None:
    for m in modules:
        for p in m.parameters():
            return p.device
    return None


def _module_dtype(*modules: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of ``modules`` (``None`` when they have none)."""
    for m in modules:
        for p in m.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _check_sample_shape(sample_shape: object) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``, or a ``ValueError`` unless it is a sequence of integers >= 0."""
    ok = isinstance(sample_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sample_shape
    )
    if not ok:
        raise ValueError(f"sample_shape: expected a tuple of integers >= 0 (e.g. (16,)), got {sample_shape!r}")
    return torch.Size(sample_shape)  # type: ignore[arg-type]
