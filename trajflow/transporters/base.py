r"""The transporter protocol: an invertible, time-conditioned map :math:`u = f_T(x, t)`.

A transporter is shared across the levels of a trajectory and told the level's time :math:`t`. It is an
:class:`torch.nn.Module` that *builds* a :class:`torch.distributions.Transform` for a given time, as zuko's
lazy transforms do, mapping data to the transporter's space (the inverse is the sampling direction).
``x`` has shape ``(*batch, *event_shape)`` and ``t`` shape ``batch`` (one time per data point).

Every method takes a condition ``cond`` (batch shape ``batch``; ``None`` is the null context) and
``drop_cond`` (bool ``batch``, True where the null context replaces ``cond``). Only a transporter whose
:attr:`Transporter.is_conditional` is True uses them, as :math:`f_T(x, t, y)` (``y`` is a constant of the
flow on ``x``, so log-determinants stay exact); they are checked where they enter the library
(:class:`~trajflow.TrajectoryDistribution`, against :attr:`Transporter.cond_spec`), not here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ..checks import check_event_shape, check_tensor
from ..conditioning import Condition, CondSpec, EventDims, align_cond

__all__ = ["Transporter", "TransporterTransform"]


class Transporter(nn.Module, ABC):
    """Base class of transporters :math:`f_T(x, t)`.

    Attributes:
        event_shape: The shape of one data point, e.g. ``(2,)`` or ``(C, H, W)``.
    """

    event_shape: torch.Size
    #: Trailing dims of one condition (0: class index, ``(2, 1)``: text features and mask); ``None``: unconditional.
    cond_event_dims: EventDims | None = None
    #: What the condition is (checked at the edges by :func:`trajflow.conditioning.check_cond`).
    cond_spec: CondSpec | None = None

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    @property
    def is_conditional(self) -> bool:
        """Whether the map depends on the condition, :math:`f_T(x, t, y)` (callers must then pass ``cond``)."""
        return self.cond_event_dims is not None

    @abstractmethod
    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""``(u, ladj)``: :math:`u = f_T(x, t[, y])` of shape ``x.shape`` and
        :math:`\log |\det \partial u / \partial x|` of shape ``batch``."""

    @abstractmethod
    def inverse(self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        r""":math:`x = f_T^{-1}(u, t[, y])` of shape ``u.shape``."""

    def transform(self, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Transform:
        """The torch :class:`~torch.distributions.Transform` :math:`x \\mapsto f_T(x, t[, y])` at time ``t``.

        ``t`` has shape ``batch``; the transform accepts inputs of shape ``(*sample, *batch, *event)``.
        ``cond`` (batch shape ``batch``) and ``drop_cond`` (``batch``) are broadcast over ``sample`` likewise.
        """
        return TransporterTransform(self, t, cond, drop_cond)

    def check_input(self, name: str, x: Tensor, t: Tensor) -> None:
        """Raise a clear error unless ``x`` is ``(*batch, *event_shape)`` and ``t`` is ``batch``."""
        check_event_shape(name, x, self.event_shape, "the transporter's event shape")
        check_tensor("t", t)
        batch = x.shape[: x.dim() - self.event_dim]
        if t.shape != batch:
            raise ValueError(f"t: expected shape {tuple(batch)} (one time per data point), got {tuple(t.shape)}")


class TransporterTransform(Transform):
    r"""A :class:`~torch.distributions.Transform` view of a transporter at fixed times ``t``.

    ``t`` has shape ``batch``; inputs ``(*sample, *batch, *event)`` are flattened to one batch so the
    transporter sees ``(N, *event)`` and ``(N,)``. ``call_and_ladj`` is fused (zuko's convention).
    """

    bijective = True

    def __init__(
        self,
        transporter: Transporter,
        t: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
        cache_size: int = 0,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.transporter = transporter
        self.t = t
        self.cond = cond
        self.drop_cond = drop_cond

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self.transporter.event_dim)

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self.transporter.event_dim)

    def with_cache(self, cache_size: int = 1) -> TransporterTransform:
        if self._cache_size == cache_size:
            return self
        return TransporterTransform(self.transporter, self.t, self.cond, self.drop_cond, cache_size=cache_size)

    def _flat(self, x: Tensor) -> tuple[Tensor, Tensor, Condition | None, Tensor | None, torch.Size]:
        """Flatten ``x`` ``(*sample, *batch, *event)`` to ``(N, *event)`` and broadcast ``t``, ``cond`` and
        ``drop_cond`` (batch shape ``batch``) to ``N``."""
        event = self.transporter.event_shape
        batch = x.shape[: x.dim() - len(event)]
        t = self.t.to(x.device).expand(batch)
        cond = drop = None
        if self.cond is not None and self.transporter.cond_event_dims is not None:
            cond = align_cond(self.cond, self.transporter.cond_event_dims, batch)
        if self.drop_cond is not None:
            drop = self.drop_cond.to(x.device).expand(batch).reshape(-1)
        return x.reshape(-1, *event), t.reshape(-1), cond, drop, batch

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat, t, cond, drop, batch = self._flat(x)
        u, ladj = self.transporter(flat, t, cond, drop)
        return u.reshape(x.shape), ladj.reshape(batch)

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, u: Tensor) -> Tensor:
        flat, t, cond, drop, _ = self._flat(u)
        return self.transporter.inverse(flat, t, cond, drop).reshape(u.shape)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]
