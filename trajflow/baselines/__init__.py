"""The baselines NTM is measured against, on the same data and budget.

* :mod:`~trajflow.baselines.flow_matching`: flow matching (loss, Euler and Heun ODE samplers, exact
  log-density and bits/dim by the probability-flow ODE);
* :mod:`~trajflow.baselines.meanflow`: MeanFlow (average velocity, one- and few-step sampling), fine-tuned
  from a flow-matching teacher;
* :mod:`~trajflow.baselines.progressive_distillation`: progressive distillation of a flow-matching teacher
  (each round halves the Euler steps);
* :mod:`~trajflow.baselines.single_flow`: one transporter used alone as a normalizing flow (TarFlow), with
  its exact bits/dim and parameter matching;
* :mod:`~trajflow.baselines.gaussian_step`: the NTM with the identity transporter (Gaussian reverse steps);
* :mod:`~trajflow.baselines.pixel_categorical`: per-pixel histograms, the exact no-training bits/dim floor.
"""

from .flow_matching import (
    FlowMatchingLoss,
    euler_sample,
    flow_matching_bits_per_dim,
    flow_matching_log_prob,
    heun_sample,
)
from .gaussian_step import gaussian_step_model
from .meanflow import MeanFlowLoss, MeanFlowVelocity, meanflow_sample
from .pixel_categorical import PixelCategorical, pixel_categorical_bits_per_dim
from .progressive_distillation import ProgressiveDistillationLoss, distillation_rounds
from .single_flow import SingleFlow, SingleFlowNLL, matched_single_flow

__all__ = [
    "FlowMatchingLoss",
    "euler_sample",
    "heun_sample",
    "flow_matching_log_prob",
    "flow_matching_bits_per_dim",
    "MeanFlowVelocity",
    "MeanFlowLoss",
    "meanflow_sample",
    "ProgressiveDistillationLoss",
    "distillation_rounds",
    "SingleFlow",
    "SingleFlowNLL",
    "matched_single_flow",
    "gaussian_step_model",
    "PixelCategorical",
    "pixel_categorical_bits_per_dim",
]
