"""Old import paths that keep working for one release, with a :class:`DeprecationWarning`."""

from __future__ import annotations

import warnings

__all__ = ["warn_moved"]


def warn_moved(old: str, new: str) -> None:
    """Warn, from the module ``old`` being imported, that its contents now live in ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in trajflow 0.3; import from {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )
