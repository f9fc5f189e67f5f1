"""Image datasets by name: :data:`IMAGE_DATASETS` and :func:`load_image_dataset`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cifar import CIFAR10_HINT, load_cifar10
from .dataset import ImageDataset
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .mnist import load_mnist

__all__ = ["IMAGE_DATASETS", "load_image_dataset"]

IMAGE_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
"""Loaders by name; ``cifar10`` needs ``path=`` (no package ships it)."""


def _key(name: object) -> object:
    """The registry key of a dataset name: lower case, ``-`` for ``_``, ``cifar10`` for ``cifar-10``."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    return "cifar10" if key == "cifar-10" else key


def load_image_dataset(name: str, split: str = "train", **kwargs: Any) -> ImageDataset:
    """Load a named dataset: ``digits``, ``mnist``, ``fashion-mnist`` (``fashion_mnist`` also accepted), or
    ``cifar10`` with ``path=``. Extra keyword arguments go to the loader (e.g. ``root=`` for Fashion-MNIST).

    Example:
        >>> load_image_dataset("digits", "test").name
        'digits'
    """
    key = _key(name)
    if key not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid names: {sorted(IMAGE_DATASETS)}")
    if key == "cifar10":
        if "path" not in kwargs:
            raise ValueError(f"cifar10 needs path=...; {CIFAR10_HINT}")
        return load_cifar10(kwargs.pop("path"), split, **kwargs)
    return IMAGE_DATASETS[key](split, **kwargs)
