"""Deprecated path of :mod:`trajflow.predictors.from_velocity`, kept for one release."""

from .._deprecation import warn_moved

warn_moved(__name__, "trajflow.predictors.from_velocity")

from .from_velocity import *  # noqa: E402, F403
from .from_velocity import __all__  # noqa: E402, F401
