r"""Likelihood of discrete data: uniform dequantisation and bits per dimension.

Integer data :math:`x \in \{0, \dots, K - 1\}^D` (``K = levels``) is dequantised into a range :math:`[a, a + w)`
(:math:`[-1, 1)` for trajflow's image models), :math:`y = a + w (x + u) / K` with :math:`u \sim U[0, 1)^D`.
A continuous density :math:`p_Y` then bounds the discrete NLL (Theis et al., 2016, Eq. 4, by Jensen):

.. math:: \text{bpd} = \frac{\mathbb{E}_u[-\log p_Y(y)]}{D \ln 2} + \log_2 \frac{K}{w} \geq -\frac{\log_2 P(x)}{D},

with the offset :math:`\log_2(K / w)`: 7 for 8-bit data on :math:`[-1, 1)` (TarFlow's ``evaluate_bpd.py``),
8 on :math:`[0, 1)` (RealNVP, Glow), 0 on :math:`[0, K)`.

Single flows (TarFlow-style stacks, zuko flows) have an exact :math:`\log p_Y`. An NTM has the exact density
of whole trajectories only, so :math:`\log p_Y(y)` is bounded below with the forward process :math:`q` as the
proposal, by the ELBO or by the importance-weighted bound (IWAE; Burda et al., 2016) with :math:`K`
trajectories, whose gap shrinks monotonically in :math:`K` (:mod:`~trajflow.likelihood.bounds`). A model
trained with :math:`t_{\min} > 0` is bounded at :math:`t_0 = t_{\min}` through a Gaussian decoder, whose
blur is part of the gap; pass the low end of its training range as ``t_min`` (:func:`elbo_bits_per_dim`).

The package: :mod:`~trajflow.likelihood.bounds` (the ELBO and IWAE of a trajectory distribution),
:mod:`~trajflow.likelihood.discrete` (dequantisation, bits/dim, the dequantising objective) and
:mod:`~trajflow.likelihood.estimates` (bits/dim of a single flow or an NTM).

References:
    | A note on the evaluation of generative models (Theis, van den Oord and Bethge, 2016).
    | https://arxiv.org/abs/1511.01844
    | Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017), Section 4.1.
    | https://arxiv.org/abs/1605.08803
    | Normalizing Flows are Capable Generative Models (TarFlow; Zhai et al., 2025), ``evaluate_bpd.py``.
    | https://arxiv.org/abs/2412.06329
    | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
    | https://arxiv.org/abs/1509.00519
    | Normalizing Trajectory Models (Gu et al., 2026). https://arxiv.org/abs/2605.08078
"""

from .bounds import LikelihoodBounds
from .discrete import (
    DequantizedObjective,
    bits_per_dim,
    bits_per_dim_offset,
    check_data_range,
    check_discrete,
    check_levels,
    dequantize,
)
from .estimates import BOUNDS, elbo_bits_per_dim, flow_bits_per_dim, iwae_bits_per_dim

__all__ = [
    "check_levels",
    "check_discrete",
    "check_data_range",
    "bits_per_dim_offset",
    "dequantize",
    "bits_per_dim",
    "flow_bits_per_dim",
    "elbo_bits_per_dim",
    "iwae_bits_per_dim",
    "BOUNDS",
    "DequantizedObjective",
    "LikelihoodBounds",
]
