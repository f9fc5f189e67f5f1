"""Fashion-MNIST from its official IDX files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from .dataset import ImageDataset, _check_split, _dataset_from_numpy

__all__ = ["load_fashion_mnist", "FASHION_MNIST_INSTALL", "FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = tuple("t-shirt/top,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot".split(","))


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (magic ``00 00 08 ndim``, big-endian sizes)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: Fashion-MNIST comes from the Debian package dataset-fashion-mnist "
            f"({FASHION_MNIST_INSTALL}, files in {FASHION_MNIST_ROOT}), or pass root= a folder with the "
            f"official IDX .gz files"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08" or len(data) < 4:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{path}: header says shape {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] = FASHION_MNIST_ROOT) -> ImageDataset:
    """Fashion-MNIST, 28x28, 1 channel, 256 levels, 10 classes: train 60000 images, test 10000.

    Read from the official IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in ``root``, which
    the Debian package ``dataset-fashion-mnist`` installs in ``/usr/share/datasets/fashion-mnist`` (the
    files from Zalando's repository work the same way).

    Example:
        >>> ds = load_fashion_mnist("test")              # doctest: +SKIP
        >>> ds.class_names[9]                            # doctest: +SKIP
        'ankle boot'
    """
    _check_split(split)
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images, labels = (_read_idx(root / f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return _dataset_from_numpy(images[:, None], labels, "fashion-mnist", split, FASHION_MNIST_CLASSES)
