"""Transporters: the shared, time-conditioned invertible maps :math:`f_T(x, t)` of an NTM."""

from .base import Transporter, TransporterTransform
from .identity import IdentityTransporter
from .nflows import NflowsTransporter
from .transformer import TransformerTransporter, TransformerTransporterConfig
from .zuko import ZukoTransporter

__all__ = [
    "Transporter",
    "TransporterTransform",
    "IdentityTransporter",
    "ZukoTransporter",
    "NflowsTransporter",
    "TransformerTransporter",
    "TransformerTransporterConfig",
]
