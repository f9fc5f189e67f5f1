"""trajflow: Normalizing Trajectory Models in PyTorch.

Few-step generative models in which every reverse step :math:`p(x_s | x_t)` of a short noising
trajectory is an exact conditional normalizing flow (Gu et al., 2026, https://arxiv.org/abs/2605.08078).
"""

from . import denoise, finetune, likelihood, predictors, transporters
from .baselines.flow_matching import FlowMatchingLoss, euler_sample, heun_sample
from .denoise import DistillationLoss, fast_sample, sample_denoised, trajectory_score_denoise
from .distribution import TrajectoryDistribution
from .finetune import FinetuneLoss, MeanAlignmentLoss, init_from_flow_matching
from .guidance import guided_gaussian
from .likelihood import bits_per_dim, dequantize, elbo_bits_per_dim, flow_bits_per_dim
from .losses import TrajectoryNLL
from .model import NTM
from .process import SAMPLE_T_MIN, TRAIN_T_MIN, MarkovInterpolant, sample_t_min, sequence_shift, time_grid

__version__ = "0.2.0"

__all__ = [
    "NTM",
    "TrajectoryDistribution",
    "MarkovInterpolant",
    "TrajectoryNLL",
    "time_grid",
    "sequence_shift",
    "sample_t_min",
    "TRAIN_T_MIN",
    "SAMPLE_T_MIN",
    "guided_gaussian",
    "FlowMatchingLoss",
    "euler_sample",
    "heun_sample",
    "trajectory_score_denoise",
    "sample_denoised",
    "fast_sample",
    "DistillationLoss",
    "init_from_flow_matching",
    "FinetuneLoss",
    "MeanAlignmentLoss",
    "dequantize",
    "bits_per_dim",
    "elbo_bits_per_dim",
    "flow_bits_per_dim",
    "transporters",
    "predictors",
    "likelihood",
    "denoise",
    "finetune",
]
