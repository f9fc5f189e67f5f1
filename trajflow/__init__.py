"""trajflow: Normalizing Trajectory Models in PyTorch.

Few-step generative models in which every reverse step :math:`p(x_s | x_t)` of a short noising
trajectory is an exact conditional normalizing flow (Gu et al., 2026, https://arxiv.org/abs/2605.08078).
"""

from . import predictors, transporters
from .distribution import TrajectoryDistribution
from .guidance import guided_gaussian
from .losses import TrajectoryNLL
from .model import NTM
from .process import MarkovInterpolant, sample_t_min, sequence_shift, time_grid

__version__ = "0.1.0"

__all__ = [
    "NTM",
    "TrajectoryDistribution",
    "MarkovInterpolant",
    "TrajectoryNLL",
    "time_grid",
    "sequence_shift",
    "sample_t_min",
    "guided_gaussian",
    "transporters",
    "predictors",
]
