r"""Pyro interop: a trained NTM as a prior in a Pyro model, for SVI and MCMC.

:func:`to_pyro` returns a shallow copy of a trajflow distribution whose class also carries Pyro's
:class:`~pyro.distributions.torch_distribution.TorchDistributionMixin` (``to_event``, ``mask``, ``expand_by``,
calling it to sample); densities, shapes and sampling are unchanged. A trajectory site's event is the whole
trajectory ``(T + 1, *data)``, and :meth:`~trajflow.TrajectoryDistribution.log_prob` is differentiable in it,
which is all that SVI and Hamiltonian Monte Carlo need. With an observation :math:`y \sim p(y | x_{t_0})`,

.. math:: p(x_{t_0}, \dots, x_{t_T} | y) \propto p_\theta(x_{t_0}, \dots, x_{t_T}) \, p(y | x_{t_0}).

The trajectory's density is sharp where the model's last steps are, a hard geometry for a sampler.
:class:`TrajectoryNoiseReparam` moves the site to the standard normal noise
:math:`\varepsilon = (x_{t_T}, z_1, \dots, z_T)` that generates it through the invertible map
:math:`x_{t_{k-1}} = F_k^{-1}(z_k; x_{t_k})` (:func:`trajectory_from_noise`, :math:`F_k` the step flow's
transform), so the prior becomes :math:`\mathcal{N}(0, I)` and only the likelihood shapes the posterior (the
NeuTra idea, with the model's own flow as the transport).

Example:
    >>> import pyro, trajflow
    >>> from trajflow.contrib.pyro import to_pyro
    >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
    ...                      trajflow.predictors.MLPPredictor(features=2))
    >>> d = to_pyro(model.distribution(trajflow.time_grid(4)))
    >>> pyro.sample("traj", d.expand((3,))).shape
    torch.Size([3, 5, 2])

References:
    | NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport (Hoffman et al., 2019).
    | https://arxiv.org/abs/1903.03704
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pyro
import pyro.distributions as pdist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.infer.reparam.reparam import Reparam
from torch import Tensor
from torch.distributions import Distribution
from zuko.distributions import NormalizingFlow

from ..checks import check_count, check_event_shape
from ..distribution import TrajectoryDistribution

__all__ = [
    "to_pyro",
    "PyroTrajectoryDistribution",
    "PyroStepFlow",
    "trajectory_from_noise",
    "noise_from_trajectory",
    "TrajectoryNoiseReparam",
    "importance_resample",
]


class PyroTrajectoryDistribution(TrajectoryDistribution, TorchDistributionMixin):
    """A :class:`~trajflow.TrajectoryDistribution` that Pyro recognises as its own."""


class PyroStepFlow(NormalizingFlow, TorchDistributionMixin):
    """A step flow :math:`p(x_{t_{k-1}} | x_{t_k})` (zuko ``NormalizingFlow``) with Pyro's mixin."""


def to_pyro(dist: Distribution) -> Distribution:
    """A copy of ``dist`` (a trajectory distribution or a step flow) usable at a ``pyro.sample`` site."""
    if isinstance(dist, TorchDistributionMixin):
        return dist
    if isinstance(dist, TrajectoryDistribution):
        cls = PyroTrajectoryDistribution
    elif isinstance(dist, NormalizingFlow):
        cls = PyroStepFlow
    else:
        raise ValueError(f"dist: expected a trajflow TrajectoryDistribution or a step flow, got {type(dist).__name__}")
    new = copy.copy(dist)
    new.__class__ = cls
    return new


def _check_trajectory_distribution(dist: object) -> TrajectoryDistribution:
    if not isinstance(dist, TrajectoryDistribution):
        raise ValueError(f"dist: expected a trajflow TrajectoryDistribution, got {type(dist).__name__}")
    return dist


def _level_dim(dist: object, name: str, x: Tensor) -> int:
    """The level dim of trajectories (or noise) ``x`` ``(*lead, T + 1, *data)`` of ``dist``, both checked."""
    dist = _check_trajectory_distribution(dist)
    check_event_shape(name, x, dist.event_shape, "(T + 1, *data) of the trajectory distribution")
    return x.dim() - len(dist.event_shape)


def trajectory_from_noise(dist: TrajectoryDistribution, noise: Tensor) -> Tensor:
    r"""The trajectory that standard normal ``noise`` generates under ``dist``, differentiably.

    ``noise[..., T, :]`` is :math:`x_{t_T}` itself and ``noise[..., k - 1, :]`` the base draw :math:`z_k` of
    step ``k`` (as :meth:`~trajflow.TrajectoryDistribution.rsample_latents`), so for the same draws this is
    :meth:`~trajflow.TrajectoryDistribution.rsample`. Each level is :math:`x_{t_{k-1}} = F_k^{-1}(z_k; x_{t_k})`
    with :math:`F_k` the transform of :meth:`~trajflow.TrajectoryDistribution.step` ``(k, x_{t_k})``: the map is
    invertible (:func:`noise_from_trajectory`) and gradients reach the noise through every step.

    Arguments:
        dist: The trajectory distribution.
        noise: Shape ``(*lead, T + 1, *data)``, ``lead`` broadcastable with ``dist.batch_shape``.

    Returns:
        The trajectory, shape ``(*lead, T + 1, *data)`` (``lead`` broadcast with the batch shape).

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> dist = model.distribution(trajflow.time_grid(4))
        >>> noise = torch.randn(3, 5, 2)
        >>> traj = trajectory_from_noise(dist, noise)
        >>> traj.shape, torch.allclose(noise_from_trajectory(dist, traj), noise, atol=1e-4)
        (torch.Size([3, 5, 2]), True)
    """
    level = _level_dim(dist, "noise", noise)
    T = dist.steps
    x = noise.select(level, T)  # x_{t_T} ~ N(0, I) is its own noise
    levels = [x]
    for k in range(T, 0, -1):
        x = dist.step(k, x).transform.inv(noise.select(level, k - 1))
        levels.append(x)
    return torch.stack(levels[::-1], dim=level)


def noise_from_trajectory(dist: TrajectoryDistribution, traj: Tensor) -> Tensor:
    r"""The standard normal noise that generates ``traj`` under ``dist``: the inverse of :func:`trajectory_from_noise`.

    Level ``k - 1`` of the result is :math:`z_k = F_k(x_{t_{k-1}}; x_{t_k})` and level ``T`` is
    :math:`x_{t_T}`; shape ``(*lead, T + 1, *data)`` as ``traj``'s (``lead`` broadcast with the batch).
    """
    level = _level_dim(dist, "traj", traj)
    T = dist.steps
    top = traj.select(level, T)
    noises = [dist.step(k, traj.select(level, k)).transform(traj.select(level, k - 1)) for k in range(1, T + 1)]
    noises.append(top.expand_as(noises[0]))  # T >= 1, so there is a step
    return torch.stack(noises, dim=level)


class TrajectoryNoiseReparam(Reparam):
    r"""Sample a trajectory site through the standard normal noise that generates it.

    A site ``name`` whose distribution is a :class:`~trajflow.TrajectoryDistribution` wrapped by
    :func:`to_pyro` or by ``pyro.contrib.zuko.ZukoToPyro`` (possibly plate-expanded or ``to_event``-ed) becomes
    an auxiliary standard normal site ``f"{name}_noise"`` of the same shape, and the trajectory
    :func:`trajectory_from_noise` is recorded at ``name`` as a deterministic site. The map's Jacobian is the
    trajectory density's change of variables, so the posterior is the same; only the geometry that SVI and
    MCMC see changes. For latent sites only (an observed site raises a :class:`ValueError`); an initial value
    at the site is mapped back to its noise with :func:`noise_from_trajectory`. Use it with
    ``pyro.poutine.reparam(model, config={"traj": TrajectoryNoiseReparam()})``.

    Example:
        >>> import pyro, trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> prior = to_pyro(model.distribution(trajflow.time_grid(4)))
        >>> def program():
        ...     with pyro.plate("examples", 3):
        ...         return pyro.sample("traj", prior)
        >>> reparam = pyro.poutine.reparam(program, config={"traj": TrajectoryNoiseReparam()})
        >>> tr = pyro.poutine.trace(reparam).get_trace()
        >>> tr.nodes["traj_noise"]["value"].shape, tr.nodes["traj"]["value"].shape
        (torch.Size([3, 5, 2]), torch.Size([3, 5, 2]))
    """

    def apply(self, msg: dict) -> dict:
        name, value = msg["name"], msg["value"]
        fn, event_dim = self._unwrap(msg["fn"])
        fn = _trajectory_of(fn, name, msg["is_observed"])
        # The noise has the trajectory's batch and event shapes: (*batch, T + 1, *data).
        zeros = torch.zeros(fn.batch_shape + fn.event_shape, device=fn.grid.device, dtype=fn.grid.dtype)
        base = pdist.Normal(zeros, torch.ones_like(zeros)).to_event(event_dim)
        noise = None if value is None else noise_from_trajectory(fn, value)
        noise = pyro.sample(f"{name}_noise", base, obs=noise, infer={"is_observed": False})
        value = trajectory_from_noise(fn, noise) if value is None else value
        # A pyro.deterministic site: the density is carried by the noise site.
        return {"fn": pdist.Delta(value, event_dim=event_dim).mask(False), "value": value, "is_observed": True}


def _trajectory_of(fn: object, name: str, is_observed: bool) -> TrajectoryDistribution:
    """The trajectory distribution of a latent site (Pyro's ``ZukoToPyro`` keeps it as ``.dist``), checked."""
    if isinstance(getattr(fn, "dist", None), TrajectoryDistribution):
        fn = fn.dist
    if not isinstance(fn, TrajectoryDistribution):
        raise ValueError(
            f"TrajectoryNoiseReparam at site {name!r}: expected a trajflow TrajectoryDistribution "
            f"(to_pyro(model.distribution(...)), optionally .expand or .to_event), got {type(fn).__name__}"
        )
    if is_observed:
        # The noise site's density differs from the trajectory's by the map's Jacobian: right for a latent
        # site (the same posterior), wrong for an observed site's likelihood.
        raise ValueError(
            f"TrajectoryNoiseReparam at site {name!r}: the site is observed; this reparameterisation is for "
            "latent trajectories only (score an observed trajectory with the distribution itself)"
        )
    return fn


def importance_resample(
    dist: TrajectoryDistribution,
    log_likelihood: Callable[[Tensor], Tensor],
    num_draws: int,
    num_samples: int,
    *,
    chunk_size: int = 65536,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    r"""Posterior trajectories by sampling-importance-resampling from the prior: the reference in low dimension.

    Draws ``num_draws`` trajectories from ``dist``, weighs each by the likelihood :math:`w_i = p(y | x^{(i)})`
    and resamples ``num_samples`` of them with replacement in proportion to the weights: exact draws of
    :math:`p(x_{t_0}, \dots, x_{t_T} | y)` as ``num_draws`` grows, reliable only while the effective sample
    size :math:`(\sum w)^2 / \sum w^2` stays large (a data space of a few dimensions).

    Arguments:
        dist: The prior, a trajectory distribution with ``batch_shape == ()``.
        log_likelihood: Maps trajectories ``(n, T + 1, *data)`` to :math:`\log p(y | x)`, shape ``(n,)``.
        num_draws: Prior draws.
        num_samples: Posterior samples returned.
        chunk_size: Prior draws per batch through the networks.
        generator: The random generator of the draws and of the resampling.

    Returns:
        ``(samples, ess)``: trajectories ``(num_samples, T + 1, *data)`` and the effective sample size of the
        weights.

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.IdentityTransporter(2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> prior = model.distribution(trajflow.time_grid(4))
        >>> near_one = lambda traj: -0.5 * ((traj[:, 0, 0] - 1.0) / 0.5) ** 2
        >>> samples, ess = importance_resample(prior, near_one, 4096, 100, generator=torch.Generator().manual_seed(0))
        >>> samples.shape, 0 < ess < 4096
        (torch.Size([100, 5, 2]), True)
    """
    dist = _check_trajectory_distribution(dist)
    if dist.batch_shape != torch.Size():
        raise ValueError(f"dist: expected batch_shape (), got {tuple(dist.batch_shape)}; use one prior per observation")
    num_draws, num_samples = check_count("num_draws", num_draws), check_count("num_samples", num_samples)
    chunk_size = check_count("chunk_size", chunk_size)
    trajs, log_ws = [], []
    with torch.no_grad():
        for start in range(0, num_draws, chunk_size):
            traj = dist.sample((min(chunk_size, num_draws - start),), generator=generator)
            log_w = log_likelihood(traj)
            if log_w.shape != traj.shape[:1]:
                raise ValueError(
                    f"log_likelihood: expected one value per trajectory, shape {tuple(traj.shape[:1])}, "
                    f"got {tuple(log_w.shape)}"
                )
            trajs.append(traj)
            log_ws.append(log_w.double())
    log_w = torch.cat(log_ws)
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError("log_likelihood: no prior draw has a finite log-likelihood")
    weights = torch.softmax(log_w, dim=0)
    ess = float(1.0 / weights.square().sum())
    index = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    return torch.cat(trajs)[index.to(trajs[0].device)], ess
