r"""A stable parameterisation of positive scales :math:`\sigma` from raw network outputs.

STARFlow soft-clips raw outputs as :math:`a \tanh(x / a)` and maps them through a softplus shifted so
that a zero output gives :math:`\sigma = 1` (method.md section 8). The clip bounds :math:`\log \sigma`
from both sides, so a single bad step cannot send the loss to infinity; the lower bound
:math:`\sigma_{\min} \approx \exp(-a + 0.54)` must stay below the finest scale the data needs
(e.g. the 2/256 bin of 8-bit images in [-1, 1]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import upcast

# softplus^{-1}(1) = log(e - 1): with it, a raw output of 0 maps to sigma = 1.
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


def soft_clip(x: Tensor, bound: float) -> Tensor:
    r""":math:`a \tanh(x / a)`: the identity near 0, bounded by :math:`\pm a`."""
    return bound * torch.tanh(x / bound)


def positive_scale(raw: Tensor, bound: float = 8.0) -> Tensor:
    r""":math:`\sigma = \mathrm{softplus}(a \tanh(x / a) + \mathrm{softplus}^{-1}(1))`; 1 at ``raw = 0``.

    Computed in float32 or wider (see :func:`trajflow.numerics.upcast`), since the scale feeds
    log-determinants.

    Example:
        >>> positive_scale(torch.zeros(2))
        tensor([1., 1.])
    """
    return F.softplus(soft_clip(upcast(raw), bound) + _SOFTPLUS_INV_ONE)
