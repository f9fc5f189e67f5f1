"""Repository-level pytest settings: doctest collection of ``trajflow`` without the optional extras.

``make test`` runs ``pytest tests --doctest-modules trajflow``. A module that imports an optional extra at
import time, or whose examples use one, is left out of doctest collection where that extra is not
installed, so that ``pip install -e ".[dev]"`` alone gives a passing run (tests of the extras skip with
``pytest.importorskip``).
"""

from importlib.util import find_spec

# module (relative to this file) -> the top-level packages its import or its doctests need
_NEEDS = {
    "trajflow/contrib/pyro.py": ("pyro",),
    "trajflow/transporters/nflows.py": ("nflows",),
    # the examples load sklearn's bundled digits
    "trajflow/data/images/__init__.py": ("sklearn",),
    "trajflow/data/images/digits.py": ("sklearn",),
    "trajflow/data/images/registry.py": ("sklearn",),
    "trajflow/train/__init__.py": ("accelerate",),  # the example runs a Trainer
}


def _missing(packages: tuple[str, ...]) -> bool:
    for name in packages:
        try:
            if find_spec(name) is None:
                return True
        except (ImportError, ValueError):
            return True
    return False


collect_ignore = [path for path, packages in _NEEDS.items() if _missing(packages)]
