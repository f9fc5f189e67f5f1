"""Predictors: the deep networks giving the Gaussian :math:`(\\mu_P, \\sigma_P)` of each NTM step."""

from .base import Predictor
from .from_velocity import FlowMatchingPredictor
from .mlp import MLPPredictor
from .transformer import TransformerBackbone, TransformerPredictor, TransformerPredictorConfig

__all__ = [
    "Predictor",
    "MLPPredictor",
    "TransformerPredictor",
    "TransformerPredictorConfig",
    "TransformerBackbone",
    "FlowMatchingPredictor",
]
