r"""The transporter protocol: an invertible, time-conditioned map :math:`u = f_T(x, t)`.

A transporter is shared across the levels of a trajectory and is told the level's time :math:`t`. It is
an :class:`torch.nn.Module` (it owns parameters) that *builds* a :class:`torch.distributions.Transform`
for a given time, as zuko's lazy transforms do. Transforms map data to the transporter's space (the
direction of the density), and the inverse is the sampling direction.

Implementations provide :meth:`Transporter.forward` and :meth:`Transporter.inverse`; :meth:`transform`
has a generic default. ``x`` always has shape ``(*batch, *event_shape)`` and ``t`` has shape ``batch``
(already broadcast; one time per data point).

**Conditions.** Every method also takes an optional condition ``cond`` (batch shape ``batch``, e.g. class
indices ``batch`` or text ``(features (*batch, L, D), mask (*batch, L))``) and ``drop_cond`` (bool,
``batch``; True where the null context replaces ``cond``, classifier-free guidance dropout). Only a
transporter whose :attr:`Transporter.is_conditional` is True uses them, as :math:`f_T(x, t, y)`; ``y`` is a
constant of the flow on ``x``, so log-determinants stay exact. The others ignore them or reject a
condition with a :class:`ValueError` naming ``cond`` (see each class).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ..checks import check_event_shape, check_tensor
from ..conditioning import Condition, EventDims, align_cond, cond_batch_shape

__all__ = ["Transporter", "TransporterTransform"]


class Transporter(nn.Module, ABC):
    """Base class of transporters :math:`f_T(x, t)`.

    Attributes:
        event_shape: The shape of one data point, e.g. ``(2,)`` or ``(C, H, W)``.
    """

    event_shape: torch.Size
    #: Trailing dims of one condition (0: class index, ``(2, 1)``: text features and mask), or ``None``
    #: for a transporter that does not see the condition.
    cond_event_dims: EventDims | None = None

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

    def check_cond(self, cond: Condition | None, drop_cond: Tensor | None, batch: torch.Size) -> None:
        """Raise a :class:`ValueError` naming ``cond`` unless it suits this transporter for data of batch
        shape ``batch``. The default: an unconditional transporter rejects a condition; a conditional one
        needs ``cond`` of batch shape ``batch`` (or ``None`` with a ``drop_cond``). Subclasses check more."""
        if not self.is_conditional:
            self.reject_cond(cond)
            return
        if cond is None:
            if drop_cond is None:
                raise ValueError("cond: this transporter is conditional, expected a condition, got None")
            return
        got = cond_batch_shape(cond, self.cond_event_dims)  # type: ignore[arg-type]
        if got != torch.Size(batch):
            raise ValueError(
                f"cond: expected batch shape {tuple(batch)} (one condition per data point), got {tuple(got)}"
            )

    def reject_cond(self, cond: Condition | None) -> None:
        """Raise a :class:`ValueError` naming ``cond`` unless it is ``None`` (for unconditional transporters)."""
        if cond is not None:
            raise ValueError(
                f"cond: {type(self).__name__} does not see the condition (it is unconditional), expected "
                f"cond=None, got {type(cond).__name__}"
            )

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
        elif self.cond is not None:
            cond = self.cond  # an unconditional transporter rejects it (or ignores it) itself
        if self.drop_cond is not None:
            drop = self.drop_cond.to(x.device).expand(batch).reshape(-1)
        return x.reshape(-1, *event), t.reshape(-1), cond, drop, batch

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat, t, cond, drop, batch = self._flat(x)
        args = () if cond is None and drop is None else (cond, drop)  # f(x, t) for unconditional ones
        u, ladj = self.transporter(flat, t, *args)
        return u.reshape(x.shape), ladj.reshape(batch)

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, u: Tensor) -> Tensor:
        flat, t, cond, drop, _ = self._flat(u)
        args = () if cond is None and drop is None else (cond, drop)
        return self.transporter.inverse(flat, t, *args).reshape(u.shape)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]
