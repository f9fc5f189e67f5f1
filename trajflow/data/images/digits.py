"""sklearn's bundled 8x8 digits (17 levels), split without random numbers."""

from __future__ import annotations

import functools

import numpy as np

from .dataset import ImageDataset, _check_split, _dataset_from_numpy

__all__ = ["load_digits", "DIGIT_CLASSES"]

DIGIT_CLASSES = tuple(str(i) for i in range(10))


def load_digits(split: str = "train") -> ImageDataset:
    """sklearn's bundled 8x8 handwritten digits: 1797 images, 1 channel, **17 levels** (0..16), 10 classes.

    The split is fixed and needs no random numbers: within each class, in file order, every 5th image
    (ranks 4, 9, 14, ...) is a test image. That gives 1442 train and 355 test images with the class balance
    of the whole set. The pixels stay integers 0..16 (``levels = 17``), so bits/dim use a bin width of
    ``2 / 17`` on the ``[-1, 1]`` scale (see the module docstring).

    Needs ``scikit-learn`` (the data file ships inside it).

    Example:
        >>> len(load_digits("train")), len(load_digits("test"))
        (1442, 355)
    """
    _check_split(split)
    images, target = _digits_arrays()
    rank = np.zeros(len(target), dtype=np.int64)
    for c in range(10):
        members = np.flatnonzero(target == c)
        rank[members] = np.arange(len(members))
    is_test = rank % 5 == 4
    keep = is_test if split == "test" else ~is_test
    return _dataset_from_numpy(images[keep][:, None], target[keep], "digits", split, DIGIT_CLASSES, levels=17)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits reads the file bundled with scikit-learn: pip install scikit-learn") from err
    bunch = _sk_load_digits()
    images = bunch.images
    if images.min() < 0 or images.max() > 16 or not np.array_equal(images, np.round(images)):
        raise ValueError("sklearn digits: expected integer pixels 0..16; the bundled file looks different")
    images = images.astype(np.uint8)
    images.flags.writeable = False  # cached: callers get copies
    target = np.asarray(bunch.target, dtype=np.int64)
    target.flags.writeable = False
    return images, target
