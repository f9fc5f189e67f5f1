"""The trajectory distribution of a Normalizing Trajectory Model: densities (:mod:`~trajflow.distribution.trajectory`),
reverse steps and sampling (:mod:`~trajflow.distribution.chain`); bounds in :mod:`trajflow.likelihood.bounds`."""

from .chain import check_compatible
from .trajectory import TrajectoryDistribution

__all__ = ["TrajectoryDistribution", "check_compatible"]
