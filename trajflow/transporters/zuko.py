r"""Transporters built from zuko flows, with the level's time as zuko's context."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import zuko
from torch import Tensor
from torch.distributions import Transform
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import Flow, LazyTransform
from zuko.nn import MaskedMLP

from ..checkpoint import Pretrained
from ..checks import check_count, check_time_features, check_times
from ..conditioning import Condition
from ..nn.embeddings import SinusoidalEmbedding
from ..numerics import upcast
from .base import Transporter

__all__ = ["ZukoTransporter"]

# Each preset and the zuko classes its keyword arguments travel through, outermost first.
_PRESETS: dict[str, tuple[type, ...]] = {
    "nsf": (zuko.flows.NSF, zuko.flows.MAF, MaskedAutoregressiveTransform, MaskedMLP),
    "maf": (zuko.flows.MAF, MaskedAutoregressiveTransform, MaskedMLP),
}
# Set by ZukoTransporter itself, not through **kwargs.
_OWN_ARGUMENTS = {"features", "context", "transforms", "hidden_features"}


def _preset_arguments(preset: str) -> list[str]:
    """The keyword arguments a preset takes through ``**kwargs`` (e.g. NSF's ``bins``, MaskedMLP's ``activation``)."""
    names: set[str] = set()
    for cls in _PRESETS[preset]:
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                names.add(p.name)
    return sorted(names - _OWN_ARGUMENTS - {"adjacency"})


def _preset_flow(
    features: int,
    preset: str,
    transforms: int,
    hidden_features: Sequence[int],
    time_features: int,
    kwargs: dict[str, Any],
) -> Flow | LazyTransform:
    """The zuko flow of ``preset`` with these arguments, each checked (a ``ValueError`` naming it)."""
    if preset not in _PRESETS:
        raise ValueError(f"preset: expected one of {sorted(_PRESETS)}, got {preset!r}")
    check_count("transforms", transforms)
    if isinstance(hidden_features, (str, bytes)) or not isinstance(hidden_features, Sequence):
        raise ValueError(f"hidden_features: expected a sequence of positive integers, got {hidden_features!r}")
    for width in hidden_features:
        check_count("hidden_features", width)
    known = _preset_arguments(preset)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(
            f"kwargs: ZukoTransporter with preset {preset!r} takes no argument(s) {unknown} (known: {known})"
        )
    try:
        return _PRESETS[preset][0](
            features, context=time_features, transforms=transforms, hidden_features=tuple(hidden_features), **kwargs
        )
    except (TypeError, ValueError) as e:  # a value zuko cannot use: say which trajflow class got it
        raise ValueError(
            f"kwargs: ZukoTransporter with preset {preset!r} could not build its flow from {sorted(kwargs)}: {e}"
        ) from e


def _lazy_transform(flow: object) -> LazyTransform:
    """A zuko ``Flow``'s transform, or a ``LazyTransform`` as it is; a ``ValueError`` naming ``flow`` otherwise."""
    flow = flow.transform if isinstance(flow, Flow) else flow
    if not isinstance(flow, LazyTransform):
        raise ValueError(f"flow: expected a zuko Flow or LazyTransform, got {type(flow).__name__}")
    return flow


class ZukoTransporter(Pretrained, Transporter):
    r"""A transporter :math:`f_T(x, t)` made of a zuko flow whose context is an embedding of :math:`t`.

    :meth:`transform` returns zuko's own :class:`~torch.distributions.Transform` (data to base, with a fused
    ``call_and_ladj``), so a step of the trajectory is a genuine zuko flow. ``cond`` and ``drop_cond`` are
    ignored. Built from a preset it can be saved with :meth:`save_pretrained` (``kwargs`` must be JSON
    values); from a user ``flow`` it cannot.

    Arguments:
        features: Dimension of the data vectors.
        flow: A zuko :class:`~zuko.lazy.Flow` or :class:`~zuko.lazy.LazyTransform` built with
            ``context=time_features``; its base distribution, if any, is unused. ``None`` builds a preset.
        preset: ``"nsf"`` (neural spline flow, zuko.flows.NSF) or ``"maf"`` (masked affine
            autoregressive flow, zuko.flows.MAF); used when ``flow`` is None.
        transforms: Number of autoregressive transforms of the preset.
        hidden_features: Hidden sizes of the preset's masked MLPs.
        time_features: Size of the sinusoidal time embedding (zuko's context), even.
        validate_args: Check that the times ``t`` are finite and in [0, 1] (a GPU synchronisation). Not part
            of the saved config.
        **kwargs: More keyword arguments for the preset (e.g. ``bins`` for NSF, ``activation`` for its
            masked MLPs); one the preset does not take is refused with a ``ValueError`` naming it.

    Example:
        >>> f = ZukoTransporter(features=2)
        >>> x, t = torch.randn(4, 2), torch.rand(4)
        >>> u, ladj = f(x, t)
        >>> torch.allclose(f.inverse(u, t), x, atol=1e-4)
        True
    """

    def __init__(
        self,
        features: int,
        flow: Flow | LazyTransform | None = None,
        *,
        preset: str = "nsf",
        transforms: int = 2,
        hidden_features: Sequence[int] = (64, 64),
        time_features: int = 16,
        validate_args: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        check_count("features", features)
        check_time_features("time_features", time_features)
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        self.validate_args = bool(validate_args)
        # The preset's constructor arguments, kept to rebuild it (config_dict); None for a user flow.
        self.preset_config: dict[str, Any] | None = None
        if flow is None:
            flow = _preset_flow(features, preset, transforms, hidden_features, time_features, kwargs)
            self.preset_config = dict(
                features=features,
                preset=preset,
                transforms=transforms,
                hidden_features=list(hidden_features),
                time_features=time_features,
                **kwargs,
            )
        elif kwargs:
            raise ValueError(
                f"kwargs: ZukoTransporter with a user flow takes no preset arguments, got {sorted(kwargs)}"
            )
        self.flow = _lazy_transform(flow)

    def config_dict(self) -> dict[str, Any]:
        """The preset's arguments; a ``TypeError`` for a transporter built from a user ``flow``."""
        if self.preset_config is None:
            raise TypeError(
                "a ZukoTransporter built from a user flow cannot be rebuilt from a config; build it from a "
                "preset (flow=None) to use save_pretrained, or save its state_dict and rebuild the flow in code"
            )
        return dict(self.preset_config)

    def transform(self, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Transform:
        """zuko's transform at times ``t`` (shape ``batch``); with ``validate_args``, ``t`` must be finite and
        in [0, 1] (a ``ValueError`` naming ``t`` otherwise)."""
        if self.validate_args:
            check_times("t", t)
        # zuko broadcasts the context (*batch, E) against inputs (*sample, *batch, F).
        return self.flow(self.time(t))

    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(u, ladj)`` for ``x`` ``(*batch, features)`` at times ``t`` ``batch`` (an empty batch gives empty
        results)."""
        transform = self.transform(t, cond)
        if x.numel() == 0:  # zuko's reshapes cannot infer a size from zero elements
            return x.clone(), upcast(x.new_zeros(x.shape[:-1]))
        u, ladj = transform.call_and_ladj(x)
        return u, upcast(ladj)

    def inverse(self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """:math:`x = f_T^{-1}(u, t)`, of ``u``'s shape."""
        transform = self.transform(t, cond)
        return u.clone() if u.numel() == 0 else transform.inv(u)
