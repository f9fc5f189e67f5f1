"""Deprecated path of :mod:`trajflow.recipes.toy` (the toy job, now a package of small modules), kept for one
release."""

from ._deprecation import warn_moved

warn_moved(__name__, "trajflow.recipes.toy")

from .recipes.toy import *  # noqa: E402, F403
from .recipes.toy import __all__  # noqa: E402, F401
