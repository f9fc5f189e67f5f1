"""CIFAR-10 from the python pickle batches in a folder the user provides (no package ships it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import ImageDataset, _check_split, _dataset_from_numpy
from .safe_pickle import _load_pickle

__all__ = ["load_cifar10", "CIFAR10_HINT", "CIFAR10_CLASSES"]

CIFAR10_HINT = (
    "no package ships CIFAR-10: download the CIFAR-10 python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass the folder that holds "
    "data_batch_1..5 and test_batch (cifar-10-batches-py)"
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(_read_pickle(path))
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: expected a pickled dict with keys 'data' and 'labels', got {sorted(batch)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.shape[1:] != (3072,) or labels.shape != data.shape[:1]:
        raise ValueError(
            f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape} and {labels.shape}"
        )
    # Each row is the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    return data.reshape(-1, 3, 32, 32), labels


def _str_keys(batch: object) -> dict:
    """A batch's dict with str keys (the official files' are bytes, pickled by Python 2), ``{}`` for another object."""
    if not isinstance(batch, dict):
        return {}
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        return _load_pickle(f, encoding="bytes")


def load_cifar10(path: str | os.PathLike[str], split: str = "train") -> ImageDataset:
    """CIFAR-10, 32x32 RGB, 256 levels, 10 classes, from the standard python pickle batches.

    ``path`` is the extracted ``cifar-10-batches-py`` folder (or its parent) of the "CIFAR-10 python version"
    (https://www.cs.toronto.edu/~kriz/cifar.html); no package ships it. ``train`` reads ``data_batch_1`` ..
    ``data_batch_5`` (50000 images), ``test`` reads ``test_batch`` (10000): pickled dicts of ``b"data"``, uint8
    ``(N, 3072)`` rows holding the red, green and blue planes of a 32x32 image, and ``b"labels"``, ``N`` ints in
    0..9, read with an unpickler that only rebuilds numpy arrays.

    Example:
        >>> ds = load_cifar10("~/data/cifar-10-batches-py", "test")   # doctest: +SKIP
        >>> ds.image_shape, len(ds)                                    # doctest: +SKIP
        ((3, 32, 32), 10000)
    """
    _check_split(split)
    root = _batches_folder(Path(path).expanduser())
    names = _BATCHES[split]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing CIFAR-10 batch file(s) {missing}; {CIFAR10_HINT}")
    images, labels = zip(*(_cifar_batch(root / n) for n in names))
    return _dataset_from_numpy(
        np.concatenate(images), np.concatenate(labels), "cifar10", split, _class_names(root / "batches.meta")
    )


def _batches_folder(root: Path) -> Path:
    """``root/cifar-10-batches-py`` when there is one, else ``root``."""
    return root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root


def _class_names(meta: Path) -> Sequence[str]:
    """The class names in ``batches.meta`` when it holds ten, else the standard ones."""
    names = _str_keys(_read_pickle(meta) if meta.is_file() else None).get("label_names")
    if names is not None and len(names) == 10:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return CIFAR10_CLASSES
