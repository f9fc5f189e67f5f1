r"""Transporters built from zuko flows, with the level's time as zuko's context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import zuko
from torch import Tensor
from torch.distributions import Transform
from zuko.lazy import Flow, LazyTransform

from ..conditioning import Condition
from ..nn.embeddings import SinusoidalEmbedding
from ..numerics import upcast
from ..pretrained import Pretrained
from .base import Transporter

__all__ = ["ZukoTransporter"]


class ZukoTransporter(Pretrained, Transporter):
    r"""A transporter :math:`f_T(x, t)` made of a zuko flow whose context is an embedding of :math:`t`.

    :meth:`transform` returns zuko's own :class:`~torch.distributions.Transform` (data to base, with a
    fused ``call_and_ladj``), so a step of the trajectory is a genuine zuko flow.

    It is unconditional: ``cond`` must be ``None`` (a :class:`ValueError` naming ``cond`` otherwise) and
    ``drop_cond`` is ignored.

    Arguments:
        features: Dimension of the data vectors.
        flow: A zuko :class:`~zuko.lazy.Flow` or :class:`~zuko.lazy.LazyTransform` built with
            ``context=time_features``; its base distribution, if any, is unused. ``None`` builds a preset.
        preset: ``"nsf"`` (neural spline flow, zuko.flows.NSF) or ``"maf"`` (masked affine
            autoregressive flow, zuko.flows.MAF); used when ``flow`` is None.
        transforms: Number of autoregressive transforms of the preset.
        hidden_features: Hidden sizes of the preset's masked MLPs.
        time_features: Size of the sinusoidal time embedding (zuko's context).
        **kwargs: More keyword arguments for the preset (e.g. ``bins`` for NSF).

    A transporter built from a preset can be saved with :meth:`save_pretrained` (its ``kwargs`` must then be
    JSON values); one built from a user ``flow`` cannot, since no config describes an arbitrary flow.

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
        **kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features: expected a positive integer, got {features!r}")
        self.event_shape = torch.Size((features,))
        self.time = SinusoidalEmbedding(time_features)
        # The preset's constructor arguments, kept to rebuild it (config_dict); None for a user flow.
        self.preset_config: dict[str, Any] | None = None
        if flow is None:
            presets = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}
            if preset not in presets:
                raise ValueError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
            flow = presets[preset](
                features,
                context=time_features,
                transforms=transforms,
                hidden_features=tuple(hidden_features),
                **kwargs,
            )
            self.preset_config = {
                "features": features,
                "preset": preset,
                "transforms": transforms,
                "hidden_features": list(hidden_features),
                "time_features": time_features,
                **kwargs,
            }
        if isinstance(flow, Flow):
            flow = flow.transform
        if not isinstance(flow, LazyTransform):
            raise ValueError(f"flow: expected a zuko Flow or LazyTransform, got {type(flow).__name__}")
        self.flow = flow

    def config_dict(self) -> dict[str, Any]:
        """The preset's arguments; a ``TypeError`` for a transporter built from a user ``flow``."""
        if self.preset_config is None:
            raise TypeError(
                "a ZukoTransporter built from a user flow cannot be rebuilt from a config; build it from a "
                "preset (flow=None) to use save_pretrained, or save its state_dict and rebuild the flow in code"
            )
        return dict(self.preset_config)


    def transform(self, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Transform:
        self.reject_cond(cond)
        # zuko broadcasts the context (*batch, E) against inputs (*sample, *batch, F).
        return self.flow(self.time(t))

    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        u, ladj = self.transform(t, cond).call_and_ladj(x)
        return u, upcast(ladj)

    def inverse(
        self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        return self.transform(t, cond).inv(u)
