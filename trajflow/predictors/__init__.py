"""Predictors: the deep networks giving the Gaussian :math:`(\\mu_P, \\sigma_P)` of each NTM step."""

from .base import Predictor
from .mlp import MLPPredictor

__all__ = ["Predictor", "MLPPredictor"]
