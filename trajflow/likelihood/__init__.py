r"""Likelihood of discrete data: uniform dequantisation and bits per dimension.

Images are integers :math:`x \in \{0, \dots, K - 1\}^D` (``K = levels``: 256 for 8-bit images, 17 for
scikit-learn's digits). A continuous model :math:`p_Y` is trained on the *dequantised* data

.. math:: y = a + w \, (x + u) / K, \qquad u \sim U[0, 1)^D,

on a data range :math:`[a, a + w)`; trajflow's image models use :math:`[-1, 1)`, i.e.
:math:`y = 2 (x + u) / K - 1`. Each integer :math:`x` owns the box :math:`B(x)` of side :math:`w / K`,
so the continuous model induces the discrete model :math:`P(x) = \int_{B(x)} p_Y(y)\, dy` and, by Jensen's
inequality (Theis et al., 2016, Eq. 4),

.. math:: -\log_2 P(x) = -\log_2 \mathbb{E}_u\big[(w/K)^D p_Y(y)\big]
          \leq \mathbb{E}_u[-\log p_Y(y)] / \ln 2 + D \log_2 (K / w).

Divided by :math:`D`, that is the bits/dim reported here:

.. math:: \text{bpd} = \frac{\mathbb{E}_u[-\log p_Y(y)]}{D \ln 2} + \log_2 \frac{K}{w},

with the offset :math:`\log_2(K / w)`: :math:`\log_2(K/2)` for :math:`[-1, 1)` (7 for 8-bit data, as in
TarFlow's ``evaluate_bpd.py``), :math:`\log_2 K` for :math:`[0, 1)` (8 for 8-bit data, RealNVP / Glow) and
0 for :math:`[0, K)`. The dequantised bits/dim is therefore an **upper bound** on the discrete NLL; it is
exact when :math:`p_Y` is constant on every box.

An NTM has no tractable :math:`p_Y(x_{t_0})`, only the exact density of whole trajectories. With
:math:`t_0 = 0` (so :math:`x_{t_0} = y`) the forward process :math:`q` gives the evidence lower bound
(a diffusion-style ELBO whose reverse terms are exact flow densities; see
:meth:`trajflow.TrajectoryDistribution.elbo`)

.. math:: \log p_Y(y) \geq \mathbb{E}_{q(x_{t_{1:T}} | y)}
          [\log p(y, x_{t_1}, \dots, x_{t_T}) - \log q(x_{t_1}, \dots, x_{t_T} | y)].

A model trained with :math:`t_{\min} > 0` never sees :math:`t_0 = 0` and its bound there is meaningless
(thousands of bits/dim). At :math:`t_0 = t_{\min} > 0` the bound is of the data through the Gaussian
decoder :math:`p(y | x_{t_0}) = \mathcal{N}(x_{t_0} / (1 - t_0), (t_0 / (1 - t_0))^2 I)` (see
:mod:`trajflow.likelihood.bounds`): still an upper bound on the discrete NLL, now of the NTM followed by
that decoder, whose blur at scale :math:`t_0` is part of the gap. :func:`elbo_bits_per_dim` takes ``t_min``,
:math:`t_0 = 0` by default (the cleanest level of the default training range
:data:`~trajflow.process.TRAIN_T_MIN`); pass the low end of the range the model was trained on.

In either case the NTM's bits/dim adds a second gap (the ELBO's) on top of the dequantisation gap, and is still an
upper bound on the discrete NLL. The importance-weighted bound (IWAE; Burda et al., 2016) with :math:`K`
forward trajectories per image,

.. math:: \log p_Y(y) \geq \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^{K}
          \frac{p(y, x^{(k)}_{t_{1:T}})}{q(x^{(k)}_{t_{1:T}} | y)}\Big],

narrows the second gap monotonically in :math:`K` and closes it as :math:`K \to \infty`
(:meth:`trajflow.TrajectoryDistribution.iwae`; ``bound="iwae"`` below). Single flows (a TarFlow-style
stack, zuko flows) have an exact :math:`\log p_Y` and only the dequantisation gap.

The package: :mod:`~trajflow.likelihood.bounds` (the ELBO and IWAE of a trajectory distribution, the methods
of :class:`~trajflow.TrajectoryDistribution`), :mod:`~trajflow.likelihood.discrete` (dequantisation, bits/dim,
the dequantising objective) and :mod:`~trajflow.likelihood.estimates` (bits/dim of a single flow or an NTM).

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
