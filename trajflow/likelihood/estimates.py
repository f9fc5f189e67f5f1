r"""Bits/dim of models on discrete data: exact for single flows, from the ELBO or IWAE bound for an NTM."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

if TYPE_CHECKING:
    from ..distribution import TrajectoryDistribution
    from ..model import NTM

from ..checks import check_count, check_event_shape
from ..conditioning import Condition
from ..process import TRAIN_T_MIN, time_grid
from .bounds import LikelihoodBounds
from .discrete import bits_per_dim, check_discrete, check_levels, dequantize

__all__ = ["BOUNDS", "flow_bits_per_dim", "elbo_bits_per_dim", "iwae_bits_per_dim"]


BOUNDS = ("elbo", "iwae")

LogDensity = Callable[[Tensor], Tensor]


def _log_density_fn(flow: Distribution | LogDensity) -> LogDensity:
    if isinstance(flow, Distribution) or hasattr(flow, "log_prob"):
        return flow.log_prob  # type: ignore[union-attr]
    if callable(flow):
        return flow
    raise ValueError(f"flow: expected a Distribution or a callable y -> log p(y), got {type(flow).__name__}")


def flow_bits_per_dim(
    flow: Distribution | LogDensity,
    x_int: Tensor,
    levels: int,
    *,
    event_dim: int | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Bits/dim of a model with an exact density (a single normalizing flow) on dequantised data.

    .. math:: \text{bpd}(x) = \frac{1}{S} \sum_{j=1}^{S} \Big[-\frac{\log p_Y(y_j)}{D \ln 2}\Big]
              + \log_2 \frac{K}{w}, \qquad y_j = \text{dequantize}(x, u_j),

    an unbiased estimate of the dequantised bits/dim (an upper bound on the discrete NLL), with no ELBO gap.

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
        dtype: The floating dtype of the dequantised data ``flow`` is evaluated on.

    Returns:
        Bits/dim per data point, shape ``batch``, float64.
    """
    log_prob = _log_density_fn(flow)
    levels = check_levels(levels)
    check_discrete("x_int", x_int, levels)
    num_samples = check_count("num_samples", num_samples)
    event_dim = _event_dim(flow, event_dim, x_int)
    batch = x_int.shape[: x_int.dim() - event_dim]
    dims = math.prod(x_int.shape[x_int.dim() - event_dim :])
    total = torch.zeros(batch, dtype=torch.float64, device=x_int.device)
    for _ in range(num_samples):
        y = dequantize(x_int, levels, generator, data_range=data_range, dtype=dtype)
        logp = log_prob(y)
        if logp.shape != batch:
            raise ValueError(f"flow: expected log-densities of shape {tuple(batch)}, got {tuple(logp.shape)}")
        total = total + bits_per_dim(logp, dims, levels, data_range)
    return total / num_samples


def _event_dim(flow: Distribution | LogDensity, event_dim: int | None, x_int: Tensor) -> int:
    if event_dim is None:
        event_dim = len(flow.event_shape) if isinstance(flow, Distribution) else 3
    if not isinstance(event_dim, int) or not 0 <= event_dim <= x_int.dim():
        raise ValueError(f"event_dim: expected an integer in [0, {x_int.dim()}], got {event_dim!r}")
    return event_dim


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

    .. math:: \text{bpd}(x) = -\frac{1}{S} \sum_{j=1}^{S} \frac{\mathcal{L}(y_j)}{D \ln 2}
              + \log_2 \frac{K_\text{levels}}{w}, \qquad y_j = \text{dequantize}(x, u_j),

    where :math:`\mathcal{L}` is the mean of the log weights :math:`\log p(y_j, x^{(k)}_{t_{1:T}}) -
    \log q(x^{(k)}_{t_{1:T}} | y_j)` of :math:`K` fresh forward trajectories (``bound="elbo"``) or their
    log-mean-exp (``bound="iwae"``, :meth:`~trajflow.TrajectoryDistribution.iwae`). Either upper-bounds
    :math:`-\log_2 P(x) / D` in expectation; the IWAE gap shrinks as :math:`K` grows, the ELBO's does not.

    At :math:`t_{\min} > 0` each trajectory starts at a fresh :math:`x_{t_0} = (1 - t_{\min}) y_j + t_{\min}
    \epsilon` and the bound is on :math:`\log p(y_j)` through the Gaussian decoder (``from_data=True``, see
    :mod:`trajflow.likelihood.bounds`). Take it at a level the model was trained on (one trained with
    :math:`t_{\min} \sim U[0.02, 0.05]` gives thousands of bits/dim at 0): a mean above
    :math:`\log_2 K_\text{levels}` (the uniform model's) comes with a warning naming ``t_min``.

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
        t_min: :math:`t_0` of the grid for an ``NTM``: the low end of the range the model was trained on
            (``None``: ``TRAIN_T_MIN[0]`` = 0; a model trained with ``t_min=(0.02, 0.05)`` needs 0.02).

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
    num_samples = check_count("num_samples", num_samples)
    num_trajectories = check_count("num_trajectories", num_trajectories)
    if bound not in (*BOUNDS, "both"):
        raise ValueError(f"bound: expected one of {(*BOUNDS, 'both')}, got {bound!r}")
    dist = _distribution_to_bound(model_or_dist, steps, cond, shift, t_min)
    starts, from_data = _grid_start(dist, t_min)
    check_event_shape("x_int", x_int, dist.data_shape, "the model's data shape")
    dims = dist.data_shape.numel()
    totals = {"iwae": 0.0, "elbo": 0.0}
    for _ in range(num_samples):
        y = dequantize(x_int.to(dist.grid.device), levels, generator, data_range=data_range)
        iwae, elbo = dist.bounds(y, num_trajectories, chunk_size=chunk_size, generator=generator, from_data=from_data)
        totals["iwae"] = totals["iwae"] + bits_per_dim(iwae, dims, levels, data_range)
        totals["elbo"] = totals["elbo"] + bits_per_dim(elbo, dims, levels, data_range)
    out = {k: v / num_samples for k, v in totals.items()}
    _warn_above_uniform(out["iwae" if bound == "both" else bound], bound, levels, starts)
    return out if bound == "both" else out[bound]  # type: ignore[return-value]


def _distribution_to_bound(
    model_or_dist: NTM | TrajectoryDistribution, steps: int, cond: Condition | None, shift: float, t_min: float | None
) -> TrajectoryDistribution:
    """``model_or_dist`` itself, or an NTM's distribution on ``time_grid(steps, t_min, shift)`` with ``cond``.

    A trajectory distribution is recognised by its bounds (:class:`LikelihoodBounds`, the base of
    :class:`~trajflow.TrajectoryDistribution`) and an NTM by what it is used for here, the module that builds
    one (``model.distribution(grid, cond)``): this module sits below both, so it imports neither.
    """
    _check_t_min(t_min)
    if isinstance(model_or_dist, LikelihoodBounds):
        return model_or_dist  # type: ignore[return-value]
    if isinstance(model_or_dist, nn.Module) and callable(getattr(model_or_dist, "distribution", None)):
        t_min = TRAIN_T_MIN[0] if t_min is None else float(t_min)
        return model_or_dist.distribution(time_grid(steps, t_min, shift, device=model_or_dist.device), cond)
    raise ValueError(f"model_or_dist: expected an NTM or a TrajectoryDistribution, got {type(model_or_dist).__name__}")


def _check_t_min(t_min: object) -> None:
    if t_min is not None and (isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0.0 <= t_min < 1.0):
        raise ValueError(
            f"t_min: expected a time in [0, 1) (the cleanest level the model was trained on), got {t_min!r}"
        )


def _grid_start(dist: TrajectoryDistribution, t_min: float | None) -> tuple[str, bool]:
    """The grid's start :math:`t_0` for messages, checked against ``t_min``, and whether the bound is on the data
    through the decoder at :math:`t_0` (``from_data``: wherever :math:`t_0 > 0`)."""
    t0 = dist.grid[..., 0]
    starts = ", ".join(f"{v:.6g}" for v in t0.unique().tolist())  # for messages (float32 grids: rounded)
    if t_min is not None and not bool(((t0.double() - float(t_min)).abs() <= 1e-6).all()):  # float32 grids
        raise ValueError(f"t_min: expected the distribution's grid start {starts} (or None), got {t_min!r}")
    # At t_0 = 0 both readings of the bounds coincide; the plain one draws no x_(t_0) (same draws as before).
    return starts, bool((t0 > 0).any())


def _warn_above_uniform(shown: Tensor, bound: str, levels: int, starts: str) -> None:
    """No silent garbage: a bound worse than the uniform model's log2(K) bits/dim says nothing about the data,
    most often because t_min is a level the model was never trained on."""
    mean, uniform = float(shown.mean()), math.log2(levels)
    if not mean <= uniform:
        warnings.warn(
            f"t_min: the {'iwae' if bound == 'both' else bound} bound at t_min={starts} is {mean:.4g} bits/dim, above "
            f"the {uniform:.4g} of a uniform model over {levels} levels, so it says nothing about the data: is the "
            "model trained, and at this level? (a model trained with t_min > 0 gives thousands of bits/dim at "
            "t_min = 0; pass the low end of its training range as t_min)",
            stacklevel=3,
        )


def iwae_bits_per_dim(
    model_or_dist: NTM | TrajectoryDistribution,
    x_int: Tensor,
    levels: int,
    steps: int = 4,
    num_trajectories: int = 64,
    **kwargs,
) -> Tensor:
    r"""Bits/dim of an NTM from its importance-weighted bound with ``num_trajectories`` :math:`K`.

    Shorthand for :func:`elbo_bits_per_dim` with ``bound="iwae"`` and the same other keyword arguments
    (``num_samples``, ``chunk_size``, ``cond``, ``shift``, ``generator``, ``data_range``, ``t_min``). With
    ``K = 1`` it is the ELBO's bits/dim.

    References:
        | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
        | https://arxiv.org/abs/1509.00519
    """
    return elbo_bits_per_dim(
        model_or_dist, x_int, levels, steps, bound="iwae", num_trajectories=num_trajectories, **kwargs
    )
