r"""The predictor protocol: :math:`(\mu_P, \sigma_P) = P(u_t, t, s, y)`.

The predictor is NTM's deep network. Given the transporter-space state :math:`u_t` at time :math:`t`, the
target time :math:`s < t` and an optional condition :math:`y`, it returns the mean and scale of the
Gaussian :math:`p(u_s | u_t, y) = \mathcal{N}(\mu_P, \mathrm{diag}\, \sigma_P^2)`.

Calls are flat: ``u_t`` is ``(N, *event_shape)``, ``t`` and ``s`` are ``(N,)``, ``cond`` is ``None`` or
``(N, *cond_event)`` (a tuple of such for multi-part conditions) and ``drop_cond`` is ``None`` or a
``(N,)`` bool mask of examples whose condition is replaced by the learned null condition (guidance
dropout, and the unconditional branch of classifier-free guidance). ``cond=None`` means all-null.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..conditioning import Condition, CondSpec, EventDims

__all__ = ["Predictor"]


class Predictor(nn.Module, ABC):
    """Base class of predictors.

    Attributes:
        event_shape: Shape of one data point (of :math:`u`).
        cond_event_dims: Trailing dims that form one condition (0 for a class index, 1 for a vector, a
            tuple for a tuple condition), or ``None`` for an unconditional predictor.
        cond_spec: What the condition is (kinds, widths, number of classes), where the predictor knows it;
            the edges check conditions against it (:func:`~trajflow.conditioning.check_cond`), so that
            :meth:`forward` need not.
    """

    event_shape: torch.Size
    cond_event_dims: EventDims | None = None
    cond_spec: CondSpec | None = None

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
