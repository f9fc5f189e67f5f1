"""Deprecated path of :mod:`trajflow.baselines.flow_matching` (and :mod:`trajflow.velocity`), kept for one release."""

from ._deprecation import warn_moved

warn_moved(__name__, "trajflow.baselines.flow_matching or trajflow.velocity")

from .baselines.flow_matching import *  # noqa: E402, F403
from .baselines.flow_matching import __all__  # noqa: E402, F401
