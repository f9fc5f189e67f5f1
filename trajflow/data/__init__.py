"""Data for trajflow: toy 2-D densities and integer image datasets, all read from local files.

Nothing here downloads at run time; each image loader says in its error message which package or path
provides its data (see :mod:`trajflow.data.images`).
"""

from . import images, toy
from .images import *  # noqa: F403
from .toy import *  # noqa: F403

__all__ = [*images.__all__, *toy.__all__]
