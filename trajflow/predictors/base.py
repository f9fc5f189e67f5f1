r"""The predictor protocol, NTM's deep network: :math:`(\mu_P, \sigma_P) = P(u_t, t, s, y)`, the Gaussian
:math:`p(u_s | u_t, y) = \mathcal{N}(\mu_P, \mathrm{diag}\, \sigma_P^2)` of the transporter-space state at
:math:`s < t`.

Calls are flat: ``u_t`` ``(N, *event_shape)``, ``t`` and ``s`` ``(N,)``, ``cond`` ``None`` (all-null) or
``(N, *cond_event)`` (a tuple of such for multi-part conditions), ``drop_cond`` ``None`` or a ``(N,)`` bool
mask of examples given the learned null condition (guidance dropout, the unconditional branch of guidance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..conditioning import Condition, CondSpec, EventDims

__all__ = ["INPUT_SPACES", "Predictor"]

#: What a predictor may read of the level it conditions on (:attr:`Predictor.input_space`).
INPUT_SPACES = ("transported", "data")


class Predictor(nn.Module, ABC):
    r"""Base class of predictors.

    Attributes:
        event_shape: Shape of one data point (of :math:`u`).
        cond_event_dims: Trailing dims that form one condition (0 for a class index, 1 for a vector, a
            tuple for a tuple condition), or ``None`` for an unconditional predictor.
        cond_spec: What the condition is (kinds, widths, number of classes), where the predictor knows it;
            the edges check conditions against it (:func:`~trajflow.conditioning.check_cond`), so that
            :meth:`forward` need not.
        input_space: What the predictor reads of the level it conditions on: ``"transported"``
            (:math:`u_t = f_T(x_t, t)`, the paper's) or ``"data"`` (:math:`x_t` itself). Both give exact
            densities, since :math:`u_t` is an invertible function of :math:`x_t`; they differ in sampling:
            with ``"transported"`` the chain runs in transporter space and the transporter is inverted once,
            at the end, so a predictor that never learns (a frozen backbone) makes the transporter act on the
            samples only through :math:`f_T^{-1}(\cdot, t_0)`; with ``"data"`` every level is inverted before
            the next step reads it, and the transporter shapes every step.
    """

    event_shape: torch.Size
    cond_event_dims: EventDims | None = None
    cond_spec: CondSpec | None = None
    input_space: str = "transported"

    @abstractmethod
    def forward(
        self,
        u_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(mu, sigma)``, each of shape ``u_t.shape``; ``sigma > 0``, in float32."""
