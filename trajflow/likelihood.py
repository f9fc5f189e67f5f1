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
:mod:`trajflow.bounds`): still an upper bound on the discrete NLL, now of the NTM followed by that decoder,
whose blur at scale :math:`t_0` is part of the gap. :func:`elbo_bits_per_dim` takes ``t_min``,
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

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from .checks import accepts_keyword, check_tensor
from .conditioning import Condition
from .distribution import TrajectoryDistribution
from .model import NTM
from .process import TRAIN_T_MIN, time_grid

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
]

BOUNDS = ("elbo", "iwae")

LogDensity = Callable[[Tensor], Tensor]


def check_levels(levels: object) -> int:
    """Raise unless ``levels`` is an integer :math:`K \\geq 2` (the number of discrete values per dimension)."""
    if isinstance(levels, Tensor) and levels.numel() == 1 and not levels.is_floating_point():
        levels = int(levels)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels: expected an integer >= 2 (e.g. 256 for 8-bit data), got {levels!r}")
    return levels


def check_data_range(data_range: object, levels: int) -> tuple[float, float]:
    """Raise unless ``data_range`` is one of ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``; return it as floats.

    Other ranges are refused on purpose: a benchmark that scaled its data some other way has almost
    certainly got the offset wrong, and should say so rather than get a silently shifted number.
    """
    allowed = ((-1.0, 1.0), (0.0, 1.0), (0.0, float(levels)))
    try:
        lo, hi = (float(v) for v in data_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"data_range: expected one of (-1, 1), (0, 1) or (0, {levels}), got {data_range!r}") from None
    if (lo, hi) not in allowed:
        raise ValueError(f"data_range: expected one of (-1, 1), (0, 1) or (0, {levels}), got {data_range!r}")
    return lo, hi


def bits_per_dim_offset(levels: int, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    r"""The offset :math:`\log_2(K / w)` added to :math:`-\log p_Y / (D \ln 2)`, for a range of width :math:`w`.

    The box of one integer has side :math:`w / K` in the scaled space, so its log-volume per dimension is
    :math:`\log_2(w / K)` bits, which the continuous density's bits must be corrected by.

    Example:
        >>> bits_per_dim_offset(256), bits_per_dim_offset(256, (0, 1)), bits_per_dim_offset(256, (0, 256))
        (7.0, 8.0, 0.0)
    """
    levels = check_levels(levels)
    lo, hi = check_data_range(data_range, levels)
    return math.log2(levels / (hi - lo))


def check_discrete(name: str, x: Tensor, levels: int) -> Tensor:
    """Raise unless ``x`` holds integer values in ``[0, levels - 1]`` (an integer or a whole-valued float tensor).

    Continuous or rescaled data passed where integers are expected would make every bits/dim offset wrong
    without any visible failure, so the values themselves are checked (one device synchronisation).
    """
    check_tensor(name, x)
    levels = check_levels(levels)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected integer pixel values in [0, {levels - 1}], got dtype {x.dtype}")
    if x.numel() == 0:
        return x
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: expected finite integer values in [0, {levels - 1}], got NaN/inf entries")
        if not bool((x == torch.round(x)).all()):
            raise ValueError(
                f"{name}: expected integer values in [0, {levels - 1}] (raw, not dequantised or rescaled data), "
                f"got floats with fractional parts"
            )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"{name}: expected integer values in [0, {levels - 1}], got values in [{lo:g}, {hi:g}]")
    return x


def dequantize(
    x_int: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Uniform dequantisation :math:`y = a + w (x + u) / K`, :math:`u \sim U[0, 1)^D`.

    For the default range :math:`[-1, 1)` this is :math:`y = 2 (x + u) / K - 1`, so :math:`y` covers the
    box of :math:`x` uniformly and never reaches 1. The arithmetic is done in float64 and the result is
    kept strictly below the box's upper edge in ``dtype``: in float32, :math:`255 + u` rounds up to 256 for
    :math:`u > 1 - 2^{-17}`, which would put a point on the next box's edge.

    This is trajflow's one dequantisation: ``trajflow.dequantize``, ``trajflow.data.dequantize`` and
    ``trajflow.data.images.dequantize`` are this function, and :meth:`~trajflow.data.ImageDataset.dequantize`
    calls it with the dataset's ``levels``.

    Arguments:
        x_int: Integer data in ``[0, levels - 1]``, any shape (e.g. uint8 images ``(N, C, H, W)``).
        levels: The number of values :math:`K` per dimension.
        generator: The random generator of :math:`u`, for reproducible evaluations.
        data_range: ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``.
        dtype: The floating dtype of the result.

    Example:
        >>> y = dequantize(torch.tensor([0, 255], dtype=torch.uint8), 256)
        >>> bool((y[0] >= -1) & (y[0] < -1 + 2 / 256)), bool((y[1] >= 1 - 2 / 256) & (y[1] < 1))
        (True, True)
    """
    levels = check_levels(levels)
    check_discrete("x_int", x_int, levels)
    lo, hi = check_data_range(data_range, levels)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
    x = x_int.to(torch.float64)
    u = torch.rand(x_int.shape, generator=generator, dtype=torch.float64, device=x_int.device)
    width = (hi - lo) / levels
    y = (lo + width * (x + u)).to(dtype)
    upper = (lo + width * (x + 1)).to(dtype)
    return torch.minimum(y, torch.nextafter(upper, torch.full_like(upper, -math.inf)))


def bits_per_dim(
    log_density_nats: Tensor,
    dims: int,
    levels: int,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    r"""Discrete bits/dim from a continuous log-density of dequantised data (an upper bound on the NLL).

    .. math:: \text{bpd} = -\frac{\log p_Y(y)}{D \ln 2} + \log_2 \frac{K}{w}

    with :math:`w` the width of ``data_range``. Pass a log-density averaged over dequantisation draws
    (or an ELBO) to get the bound of the module docstring; it is exact for densities that are constant on
    every integer's box.

    Arguments:
        log_density_nats: :math:`\log p_Y(y)` (or a lower bound on it) in nats, summed over the :math:`D`
            dimensions of each data point; any shape.
        dims: :math:`D`, the number of dimensions of one data point (``C * H * W``).
        levels: :math:`K`.
        data_range: The range the data was scaled to: ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``.

    Returns:
        Bits per dimension, same shape as ``log_density_nats``, in float64 (so that the offset of a few bits
        does not eat float32's precision on the small differences benchmarks compare).

    Example:
        >>> # the uniform density 2^-D on [-1, 1)^D: every one of the 256 values has probability 1/256
        >>> round(float(bits_per_dim(torch.tensor(-3 * math.log(2.0)), dims=3, levels=256)), 6)
        8.0
    """
    check_tensor("log_density_nats", log_density_nats)
    if not log_density_nats.is_floating_point():
        raise ValueError(f"log_density_nats: expected a floating-point tensor, got dtype {log_density_nats.dtype}")
    if bool(torch.isnan(log_density_nats).any()) or bool((log_density_nats == math.inf).any()):
        # -inf is a legitimate log-density (infinite bits); NaN or +inf are a broken model.
        raise ValueError("log_density_nats: expected values in [-inf, inf), got NaN or +inf entries")
    if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
        raise ValueError(f"dims: expected a positive integer (the dimensions of one data point), got {dims!r}")
    offset = bits_per_dim_offset(levels, data_range)
    return -log_density_nats.double() / (dims * math.log(2.0)) + offset


def _log_density_fn(flow: Distribution | LogDensity) -> LogDensity:
    if isinstance(flow, Distribution) or hasattr(flow, "log_prob"):
        return flow.log_prob  # type: ignore[union-attr]
    if callable(flow):
        return flow
    raise ValueError(f"flow: expected a Distribution or a callable y -> log p(y), got {type(flow).__name__}")


def _check_num_samples(num_samples: object, name: str = "num_samples") -> int:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {num_samples!r} ({type(num_samples).__name__})")
    return num_samples


def flow_bits_per_dim(
    flow: Distribution | LogDensity,
    x_int: Tensor,
    levels: int,
    *,
    event_dim: int | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    r"""Bits/dim of a model with an exact density (a single normalizing flow) on dequantised data.

    .. math:: \text{bpd}(x) = \frac{1}{S} \sum_{j=1}^{S} \Big[-\frac{\log p_Y(y_j)}{D \ln 2}\Big]
              + \log_2 \frac{K}{w}, \qquad y_j = \text{dequantize}(x, u_j),

    an unbiased estimate of the dequantised bits/dim, which upper-bounds the discrete NLL in expectation
    over :math:`u` (Jensen; see the module docstring). There is no ELBO gap: :math:`\log p_Y` is exact.

    Arguments:
        flow: A ``Distribution`` (its ``log_prob`` is used) or a callable ``y -> log p(y)`` returning one
            log-density in nats per data point, summed over the event.
        x_int: Integer data ``(*batch, *event)`` in ``[0, levels - 1]``.
        levels: :math:`K`.
        event_dim: Number of trailing event dims of ``x_int``; defaults to the distribution's
            ``event_shape`` (or 3 for images when ``flow`` is a plain callable).
        num_samples: Dequantisation draws :math:`S` averaged per data point.
        generator: The random generator of the dequantisation noise.
        data_range: The range ``flow`` was trained on.

    Returns:
        Bits/dim per data point, shape ``batch``, float64.
    """
    log_prob = _log_density_fn(flow)
    levels = check_levels(levels)
    check_discrete("x_int", x_int, levels)
    num_samples = _check_num_samples(num_samples)
    if event_dim is None:
        event_dim = len(flow.event_shape) if isinstance(flow, Distribution) else 3
    if not isinstance(event_dim, int) or not 0 <= event_dim <= x_int.dim():
        raise ValueError(f"event_dim: expected an integer in [0, {x_int.dim()}], got {event_dim!r}")
    batch = x_int.shape[: x_int.dim() - event_dim]
    dims = math.prod(x_int.shape[x_int.dim() - event_dim :])
    total = torch.zeros(batch, dtype=torch.float64, device=x_int.device)
    for _ in range(num_samples):
        y = dequantize(x_int, levels, generator, data_range=data_range)
        logp = log_prob(y)
        if logp.shape != batch:
            raise ValueError(f"flow: expected log-densities of shape {tuple(batch)}, got {tuple(logp.shape)}")
        total = total + bits_per_dim(logp, dims, levels, data_range)
    return total / num_samples


def elbo_bits_per_dim(
    model_or_dist: NTM | TrajectoryDistribution,
    x_int: Tensor,
    levels: int,
    steps: int = 4,
    num_samples: int = 1,
    *,
    bound: str = "elbo",
    num_trajectories: int = 1,
    chunk_size: int | None = None,
    cond: Condition | None = None,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    t_min: float | None = None,
) -> Tensor | dict[str, Tensor]:
    r"""Bits/dim of an NTM from a lower bound on the density of the dequantised data, taken at :math:`t_0 = t_{\min}`.

    With ``bound="elbo"`` (the default):

    .. math:: \text{bpd}(x) = -\frac{1}{S} \sum_{j=1}^{S} \frac{1}{K} \sum_{k=1}^{K}
              \frac{\log p(y_j, x^{(jk)}_{t_{1:T}}) - \log q(x^{(jk)}_{t_{1:T}} | y_j)}{D \ln 2}
              + \log_2 \frac{K_\text{levels}}{w};

    with ``bound="iwae"`` the inner average over the :math:`K` trajectories moves inside a log-mean-exp
    (:meth:`~trajflow.TrajectoryDistribution.iwae`):

    .. math:: \text{bpd}(x) = -\frac{1}{S} \sum_{j=1}^{S}
              \frac{\log \frac{1}{K} \sum_{k} p(y_j, x^{(jk)}_{t_{1:T}}) / q(x^{(jk)}_{t_{1:T}} | y_j)}{D \ln 2}
              + \log_2 \frac{K_\text{levels}}{w},

    with fresh dequantisation noise :math:`y_j` per draw :math:`j` and :math:`K` fresh forward trajectories
    :math:`x^{(jk)} \sim q(\cdot|y_j)` per dequantised image. The expectation of either upper-bounds
    :math:`-\log_2 P(x) / D`: the bound's gap (the forward process is the proposal) adds to the
    dequantisation gap of Jensen's inequality. The IWAE gap shrinks as :math:`K` grows (Burda et al.,
    2016); the ELBO's does not.

    The grid starts at :math:`t_0 = t_{\min}`. At :math:`t_{\min} = 0` the trajectories start at the data,
    :math:`x_{t_0} = y_j`. At :math:`t_{\min} > 0` each trajectory starts at a fresh
    :math:`x_{t_0} = (1 - t_{\min}) y_j + t_{\min} \epsilon` and the bound is on :math:`\log p(y_j)` through
    the Gaussian decoder at :math:`t_{\min}` (``from_data=True`` of :meth:`~trajflow.TrajectoryDistribution.bounds`,
    see :mod:`trajflow.bounds`): the weights gain :math:`D \log(1 - t_{\min})` and the number is still about
    the data, not about noised data, with the decoder's blur in the gap. Take the bound at a level the model
    was trained on: a model trained with :math:`t_{\min} \sim U[0.02, 0.05]` evaluated at 0 gives thousands
    of bits/dim. A result whose mean exceeds :math:`\log_2 K_\text{levels}` bits/dim (the uniform model's)
    is reported with a warning naming ``t_min``.

    Arguments:
        model_or_dist: An :class:`~trajflow.NTM` (the grid is ``time_grid(steps, t_min, shift)``) or a
            :class:`~trajflow.TrajectoryDistribution`, whose grid gives :math:`t_0` (``steps``/``shift``/
            ``cond`` are then ignored, and ``t_min``, if given, must match it).
        x_int: Integer data ``(*batch, *event)`` in ``[0, levels - 1]``, the event being the model's data
            shape.
        levels: :math:`K_\text{levels}`.
        steps: :math:`T`, the number of reverse steps, for an ``NTM``.
        num_samples: :math:`S`, the dequantisation draws averaged per data point.
        bound: ``"elbo"``, ``"iwae"``, or ``"both"`` for a dict ``{"iwae": ..., "elbo": ...}`` of the two
            from the same draws (one set of network evaluations).
        num_trajectories: :math:`K`, the forward trajectories per dequantised image.
        chunk_size: Trajectories per image evaluated at once (memory; see
            :meth:`~trajflow.TrajectoryDistribution.iwae`); ``None`` picks one.
        cond: The condition for an ``NTM`` (class labels, ...), with ``x_int``'s batch shape, or ``None``.
        shift: The grid's shift for an ``NTM`` (see :func:`trajflow.time_grid`).
        generator: The random generator of the dequantisation noise and of the forward trajectories.
        data_range: The range the model was trained on (trajflow's image models use ``(-1, 1)``).
        t_min: :math:`t_0` of the grid for an ``NTM``: the low end of the range the model was trained on.
            ``None``: ``TRAIN_T_MIN[0]`` = 0, the cleanest level of the default training range
            (:data:`~trajflow.process.TRAIN_T_MIN`); a model trained with ``t_min=(0.02, 0.05)`` needs
            ``t_min=0.02``.

    Returns:
        Bits/dim per data point, ``x_int``'s batch shape broadcast with the distribution's, float64 (a dict
        of two such tensors for ``bound="both"``).

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.IdentityTransporter((4,)),
        ...                      trajflow.predictors.MLPPredictor(features=4))
        >>> x = torch.randint(0, 17, (8, 4))
        >>> elbo_bits_per_dim(model, x, 17, t_min=0.02, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8])
    """
    levels = check_levels(levels)
    check_discrete("x_int", x_int, levels)
    num_samples = _check_num_samples(num_samples)
    num_trajectories = _check_num_samples(num_trajectories, "num_trajectories")
    if bound not in (*BOUNDS, "both"):
        raise ValueError(f"bound: expected one of {(*BOUNDS, 'both')}, got {bound!r}")
    if t_min is not None and (isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0.0 <= t_min < 1.0):
        raise ValueError(
            f"t_min: expected a time in [0, 1) (the cleanest level the model was trained on), got {t_min!r}"
        )
    if isinstance(model_or_dist, TrajectoryDistribution):
        dist = model_or_dist
    elif isinstance(model_or_dist, NTM):
        t_min = TRAIN_T_MIN[0] if t_min is None else float(t_min)
        dist = model_or_dist.distribution(time_grid(steps, t_min, shift, device=model_or_dist.device), cond)
    else:
        raise ValueError(
            f"model_or_dist: expected an NTM or a TrajectoryDistribution, got {type(model_or_dist).__name__}"
        )
    t0 = dist.grid[..., 0]
    starts = ", ".join(f"{v:.6g}" for v in t0.unique().tolist())  # for messages (float32 grids: rounded)
    if t_min is not None and not bool(((t0.double() - float(t_min)).abs() <= 1e-6).all()):  # float32 grids
        raise ValueError(f"t_min: expected the distribution's grid start {starts} (or None), got {t_min!r}")
    # At t_0 = 0 both readings of the bounds coincide; the plain one draws no x_(t_0) (same draws as before).
    from_data = bool((t0 > 0).any())
    data_shape = dist.data_shape
    if x_int.dim() < len(data_shape) or x_int.shape[x_int.dim() - len(data_shape) :] != data_shape:
        raise ValueError(
            f"x_int: expected trailing shape {tuple(data_shape)} (the model's data shape), got {tuple(x_int.shape)}"
        )
    dims = data_shape.numel()
    device = dist.grid.device
    totals = {"iwae": 0.0, "elbo": 0.0}
    for _ in range(num_samples):
        y = dequantize(x_int.to(device), levels, generator, data_range=data_range)
        iwae, elbo = dist.bounds(y, num_trajectories, chunk_size=chunk_size, generator=generator, from_data=from_data)
        totals["iwae"] = totals["iwae"] + bits_per_dim(iwae, dims, levels, data_range)
        totals["elbo"] = totals["elbo"] + bits_per_dim(elbo, dims, levels, data_range)
    out = {k: v / num_samples for k, v in totals.items()}
    # No silent garbage: a bound worse than the uniform model's log2(K) bits/dim says nothing about the data,
    # most often because t_min is a level the model was never trained on.
    shown = out["iwae" if bound == "both" else bound]
    mean, uniform = float(shown.mean()), math.log2(levels)
    if not mean <= uniform:
        warnings.warn(
            f"t_min: the {'iwae' if bound == 'both' else bound} bound at t_min={starts} is {mean:.4g} bits/dim, above "
            f"the {uniform:.4g} of a uniform model over {levels} levels, so it says nothing about the data: is the "
            "model trained, and at this level? (a model trained with t_min > 0 gives thousands of bits/dim at "
            "t_min = 0; pass the low end of its training range as t_min)",
            stacklevel=2,
        )
    return out if bound == "both" else out[bound]  # type: ignore[return-value]


def iwae_bits_per_dim(
    model_or_dist: NTM | TrajectoryDistribution,
    x_int: Tensor,
    levels: int,
    steps: int = 4,
    num_trajectories: int = 64,
    **kwargs,
) -> Tensor:
    r"""Bits/dim of an NTM from its importance-weighted bound with ``num_trajectories`` :math:`K`.

    Shorthand for :func:`elbo_bits_per_dim` with ``bound="iwae"``; the other keyword arguments
    (``num_samples``, ``chunk_size``, ``cond``, ``shift``, ``generator``, ``data_range``, ``t_min``) are the
    same.
    With ``K = 1`` it is the ELBO's bits/dim.

    References:
        | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
        | https://arxiv.org/abs/1509.00519
    """
    return elbo_bits_per_dim(
        model_or_dist, x_int, levels, steps, bound="iwae", num_trajectories=num_trajectories, **kwargs
    )


@dataclass
class DequantizedObjective:
    """A :class:`~trajflow.train.Trainer` objective for discrete images: the loss on a fresh dequantisation.

    Each batch ``(images, labels)`` of integer images ``(N, C, H, W)`` in ``0..levels-1`` is dequantised
    uniformly into [-1, 1) (:func:`dequantize`, with the trainer's generator), then ``loss(model, y,
    generator=generator)`` is returned, with ``step=step`` and ``progress=progress`` added for a loss whose
    signature takes them (a schedule, e.g. :class:`~trajflow.finetune.FinetuneLoss`'s lambda; see
    :class:`~trajflow.train.Objective`). With a negative log-likelihood in nats/dim (``TrajectoryNLL``,
    ``SingleFlowNLL``) this trains the continuous density whose ELBO/IWAE bounds the discrete one
    (:func:`elbo_bits_per_dim`, :func:`iwae_bits_per_dim`).

    Arguments:
        loss: ``(model, y, *, generator) -> scalar`` (or ``(scalar, logs)``): :class:`~trajflow.TrajectoryNLL`,
            :class:`~trajflow.baselines.SingleFlowNLL`, :class:`~trajflow.baselines.FlowMatchingLoss`, or one
            that also takes ``step`` / ``progress`` such as :class:`~trajflow.finetune.FinetuneLoss`.
        levels: The number of intensity levels of the images.
        loss_name: The loss's name in the trainer's logs.

    Example:
        >>> import trajflow
        >>> objective = DequantizedObjective(trajflow.TrajectoryNLL(steps=2), levels=17)
        >>> model = trajflow.NTM(trajflow.transporters.IdentityTransporter((4,)),
        ...                      trajflow.predictors.MLPPredictor(features=4))
        >>> images = torch.randint(0, 17, (8, 4))
        >>> objective(model, (images, torch.zeros(8)), torch.Generator().manual_seed(0), step=0).shape
        torch.Size([])
    """

    loss: Any
    levels: int
    loss_name: str = "nll_per_dim"

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels)
        if not callable(self.loss):
            raise ValueError(f"loss: expected a callable loss(model, y, *, generator), got {type(self.loss).__name__}")
        # Which schedule inputs the loss takes, read once: the NLLs take neither.
        self._schedule = tuple(name for name in ("step", "progress") if accepts_keyword(self.loss, name))

    def __call__(
        self,
        model: torch.nn.Module,
        batch: Any,
        generator: torch.Generator,
        step: int,
        *,
        progress: float | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        values = {"step": step, "progress": progress}
        extra = {name: values[name] for name in self._schedule if values[name] is not None}
        return self.loss(model, dequantize(images, self.levels, generator), generator=generator, **extra)
