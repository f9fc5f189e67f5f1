"""trajflow: Normalizing Trajectory Models in PyTorch.

Few-step generative models in which every reverse step :math:`p(x_s | x_t)` of a short noising trajectory
is an exact conditional normalizing flow (Gu et al., 2026, https://arxiv.org/abs/2605.08078).

The top level holds what the README's ten lines need: the model (:class:`NTM`), its distribution
(:class:`TrajectoryDistribution`), the forward process (:class:`MarkovInterpolant`, :func:`time_grid`), the
loss (:class:`TrajectoryNLL`) and the :class:`Trainer`; the parts live in their subpackages
(``trajflow.transporters``, ``trajflow.predictors``, ``trajflow.velocity``, ``trajflow.baselines``, ...).
"""

__version__ = "0.3.0"

from . import baselines, denoise, finetune, likelihood, nn, predictors, transporters, velocity
from .distribution import TrajectoryDistribution
from .losses import TrajectoryNLL
from .model import NTM
from .process import MarkovInterpolant, time_grid
from .train import Trainer, TrainerConfig

__all__ = [
    "NTM",
    "TrajectoryDistribution",
    "MarkovInterpolant",
    "time_grid",
    "TrajectoryNLL",
    "Trainer",
    "TrainerConfig",
    "baselines",
    "denoise",
    "finetune",
    "likelihood",
    "nn",
    "predictors",
    "transporters",
    "velocity",
]
