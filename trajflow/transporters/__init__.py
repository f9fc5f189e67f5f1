"""Transporters: the shared, time-conditioned invertible maps :math:`f_T(x, t)` of an NTM."""

from .base import Transporter, TransporterTransform
from .identity import IdentityTransporter
from .nflows import NflowsTransporter
from .static_inverse import StaticCacheInverse
from .transformer import INVERSE_METHODS, TransformerTransporter, TransformerTransporterConfig
from .zuko import ZukoTransporter

__all__ = [
    "Transporter",
    "TransporterTransform",
    "IdentityTransporter",
    "ZukoTransporter",
    "NflowsTransporter",
    "TransformerTransporter",
    "TransformerTransporterConfig",
    "INVERSE_METHODS",
    "StaticCacheInverse",
]
