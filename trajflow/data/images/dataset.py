"""The integer image dataset every loader returns: :class:`ImageDataset` (uint8 pixels, labels, levels)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...checks import check_count
from ...likelihood import bits_per_dim, dequantize
from .pixels import _check_levels, from_unit_range, to_unit_range

__all__ = ["ImageDataset"]

_SPLITS = ("train", "test")


def _described(x: object) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_images(images: object) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images: expected a uint8 tensor of shape (N, C, H, W), got {_described(images)}")


def _checked_labels(labels: object, n: int) -> Tensor:
    """``labels`` as int64 ``(n,)`` (zeros for ``None``), or a ``ValueError`` naming ``labels``."""
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor of shape ({n},), got {_described(labels)}")
    return labels.to(torch.int64)


def _check_values(images: Tensor, labels: Tensor, levels: int, num_classes: int) -> None:
    """Pixels below ``levels`` and labels in ``0..num_classes - 1`` (one read of their ranges each)."""
    if images.numel() and int(images.max()) >= levels:
        raise ValueError(f"images: values must be < levels={levels}, got a maximum of {int(images.max())}")
    if num_classes < 0 or (num_classes and not _in_range(labels, num_classes)):
        raise ValueError(f"labels: expected values in 0..{num_classes - 1} (num_classes={num_classes})")


def _in_range(labels: Tensor, num_classes: int) -> bool:
    return not labels.numel() or (int(labels.min()) >= 0 and int(labels.max()) < num_classes)


class ImageDataset(Dataset):
    """Integer images with labels, held in memory.

    Arguments:
        images: uint8 tensor ``(N, C, H, W)`` with values in ``0..levels-1``.
        labels: int64 tensor ``(N,)``; all zeros (and ``num_classes = 0``) for unlabelled data.
        levels: Number of discrete pixel values (256 for 8-bit data, 17 for sklearn digits).
        num_classes: Number of classes, ``0`` for unlabelled data.
        name: Dataset name (e.g. ``"mnist"``).
        split: ``"train"``, ``"test"`` or a free-form tag.
        class_names: Optional names of the classes, ``len == num_classes``.
        transform: Optional callable applied to the ``(C, H, W)`` uint8 image in ``__getitem__``.

    ``dataset[i]`` returns ``(image, label)`` with the image as uint8 ``(C, H, W)`` (or whatever
    ``transform`` makes of it, e.g. :meth:`unit_range` datasets return float32 in ``[-1, 1]``) and the label
    as a 0-dim int64 tensor, so a standard ``DataLoader`` batches it. For small CPU runs it is faster to skip
    the ``DataLoader`` and index ``dataset.to_unit_range()`` directly.

    Example:
        >>> ds = ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4), levels=256,
        ...                   num_classes=4, name="zeros")
        >>> ds.subset(2).images.shape
        torch.Size([2, 1, 2, 2])
        >>> image, label = ds.unit_range()[3]
        >>> image.dtype, int(label)
        (torch.float32, 3)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        levels: int = 256,
        num_classes: int = 0,
        name: str = "images",
        split: str = "",
        class_names: Sequence[str] | None = None,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        _check_levels(levels)
        _check_images(images)
        labels = _checked_labels(labels, images.shape[0])
        _check_values(images, labels, levels, num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.images = images
        self.labels = labels
        self.levels = levels
        self.num_classes = num_classes
        self.name = name
        self.split = split
        self.class_names = tuple(class_names) if class_names is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        """Number of dimensions per image ``D = C * H * W`` (the divisor of bits/dim)."""
        return math.prod(self.image_shape)

    @property
    def bin_width(self) -> float:
        """Width of one pixel bin on the ``[-1, 1]`` scale: ``2 / levels``."""
        return 2.0 / self.levels

    def to_unit_range(self, images: Tensor | None = None) -> Tensor:
        """Float32 bin centres in ``[-1, 1]`` of ``images`` (default: all), see :func:`to_unit_range`."""
        return to_unit_range(self.images if images is None else images, self.levels)

    def from_unit_range(self, x: Tensor) -> Tensor:
        """Quantise floats in ``[-1, 1]`` to this dataset's integer levels, see :func:`from_unit_range`."""
        return from_unit_range(x, self.levels)

    def dequantize(self, images: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Uniformly dequantised floats in ``[-1, 1)`` (:func:`trajflow.likelihood.dequantize` with this
        dataset's ``levels``) of ``images`` (default: all)."""
        return dequantize(self.images if images is None else images, self.levels, generator=generator)

    def bits_per_dim(self, nll: Tensor | float) -> Tensor:
        """Bits/dim from a negative log-density in nats per image on the ``[-1, 1]`` scale
        (:func:`trajflow.likelihood.bits_per_dim`; with uniform dequantisation, a bound on the discrete data's)."""
        return bits_per_dim(-torch.as_tensor(nll, dtype=torch.float64), self.dim, self.levels)

    def unit_range(self) -> ImageDataset:
        """The same data (shared storage) whose items are float32 images in ``[-1, 1]`` (bin centres)."""
        return self._with(self.images, self.labels, transform=functools.partial(to_unit_range, levels=self.levels))

    def select(self, indices: Tensor | Sequence[int] | slice) -> ImageDataset:
        """A new dataset holding the rows ``indices`` (a slice, an index list or a boolean mask)."""
        if isinstance(indices, slice):
            return self._with(self.images[indices], self.labels[indices])
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return self._with(self.images[idx], self.labels[idx])

    def subset(self, n: int, *, generator: torch.Generator | None = None) -> ImageDataset:
        """The first ``n`` images, or ``n`` random ones (without replacement) if a ``generator`` is given; ``n``
        is capped at the dataset's length (small CPU configs can ask for e.g. 2000 images of any dataset)."""
        n = min(check_count("n", n, low=0), len(self))
        if generator is None:
            return self.select(slice(0, n))
        return self.select(torch.randperm(len(self), generator=generator)[:n].sort().values)

    def _with(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Any] | None = None) -> ImageDataset:
        kept = {k: getattr(self, k) for k in ("levels", "num_classes", "name", "split", "class_names")}
        return ImageDataset(images, labels, transform=transform or self.transform, **kept)

    def class_counts(self) -> Tensor:
        """Number of images per class, int64 ``(num_classes,)`` (``(1,)`` for unlabelled data)."""
        return torch.bincount(self.labels, minlength=max(self.num_classes, 1))

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.image_shape}, levels={self.levels}, num_classes={self.num_classes})"
        )


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split: expected one of {list(allowed)}, got {split!r}")
    return split


def _dataset_from_numpy(
    images: np.ndarray,
    labels: np.ndarray | None,
    name: str,
    split: str,
    class_names: Sequence[str] | None,
    *,
    levels: int = 256,
    num_classes: int = 10,
) -> ImageDataset:
    """An :class:`ImageDataset` owning copies of the loader's arrays (8-bit and 10 classes by default)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if not images.flags.writeable:  # cached or np.frombuffer arrays: torch needs its own writable memory
        images = images.copy()
    x = torch.from_numpy(images)
    y = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return ImageDataset(x, y, levels=levels, num_classes=num_classes, name=name, split=split, class_names=class_names)
