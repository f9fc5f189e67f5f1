"""The trajectory distribution of a Normalizing Trajectory Model (:class:`TrajectoryDistribution`), one module per
part: :mod:`~trajflow.distribution.trajectory` (the density of whole trajectories and of pairs of levels),
:mod:`~trajflow.distribution.chain` (each reverse step as a flow distribution, and sampling) and
:mod:`~trajflow.distribution.common`; its ELBO and IWAE bounds are in :mod:`trajflow.likelihood.bounds`."""

from .common import check_compatible
from .trajectory import TrajectoryDistribution

__all__ = ["TrajectoryDistribution", "check_compatible"]
