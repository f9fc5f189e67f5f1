"""Deprecated path of :mod:`trajflow.recipes.t2i`, kept for one release."""

from ._deprecation import warn_moved

warn_moved(__name__, "trajflow.recipes.t2i")

from .recipes.t2i import *  # noqa: E402, F403
from .recipes.t2i import __all__  # noqa: E402, F401
