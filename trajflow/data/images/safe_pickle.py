"""Reading the pickled data files of MNIST and CIFAR-10 without letting a pickle run code."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

__all__: list[str] = []


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays.

    The MNIST and CIFAR-10 files are pickles, and a pickle can run arbitrary code when loaded; allowing only
    numpy's array-reconstruction functions keeps a tampered or wrong file from doing anything but failing.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Protocol-2 pickles from Python 3 store bytes as _codecs.encode(str, "latin1"), a pure function.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        # Pickles written by numpy 1.x name ``numpy.core``; numpy 2 moved it to ``numpy._core``.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _load_pickle(fh: io.BufferedIOBase, encoding: str) -> Any:
    return _ArrayUnpickler(fh, encoding=encoding).load()
