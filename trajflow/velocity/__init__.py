r"""Velocity models :math:`v_\theta(x_t, t, y)`: what flow matching trains and an NTM predictor is initialised from.

A velocity model predicts :math:`\epsilon - x_0` at :math:`x_t = (1 - t) x_0 + t \epsilon` and returns
``(v, hidden)``, its last hidden states included. The flow-matching baseline
(:mod:`trajflow.baselines.flow_matching`) trains and integrates one; an NTM predictor is built around one by
:class:`~trajflow.predictors.FlowMatchingPredictor`. Every velocity model of the library lives here; the
diffusers adapters are in :mod:`trajflow.contrib.diffusers`.
"""

from .base import VelocityModel, guided_velocity
from .callable import CallableVelocity
from .mlp import MLPVelocity
from .transformer import TransformerVelocity

__all__ = ["VelocityModel", "MLPVelocity", "TransformerVelocity", "CallableVelocity", "guided_velocity"]
