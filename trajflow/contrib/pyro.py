"""Pyro interop: put a :class:`~trajflow.TrajectoryDistribution` or a step flow at a ``pyro.sample`` site.

Pyro's sample sites expect its :class:`~pyro.distributions.torch_distribution.TorchDistributionMixin`
(``to_event``, ``mask``, ``expand_by``, calling the distribution to sample). :func:`to_pyro` returns a
shallow copy of a trajflow distribution whose class also carries the mixin; densities, shapes and
sampling are unchanged.

Example:
    >>> import pyro, trajflow
    >>> from trajflow.contrib.pyro import to_pyro
    >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
    ...                      trajflow.predictors.MLPPredictor(features=2))
    >>> d = to_pyro(model.distribution(trajflow.time_grid(4)))
    >>> pyro.sample("traj", d.expand((3,))).shape
    torch.Size([3, 5, 2])
"""

from __future__ import annotations

import copy

from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import Distribution
from zuko.distributions import NormalizingFlow

from ..distribution import TrajectoryDistribution

__all__ = ["to_pyro", "PyroTrajectoryDistribution", "PyroStepFlow"]


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
        raise ValueError(
            f"dist: expected a trajflow TrajectoryDistribution or a step flow, got {type(dist).__name__}"
        )
    new = copy.copy(dist)
    new.__class__ = cls
    return new
