"""Data for trajflow: toy 2-D densities and integer image datasets, all read from local files.

Nothing here downloads at run time; each image loader says in its error message which package or path
provides its data (see :mod:`trajflow.data.images`).
"""

from .images import (
    IMAGE_DATASETS,
    ImageDataset,
    dequantize,
    from_unit_range,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_image_array,
    load_image_dataset,
    load_image_folder,
    load_mnist,
    to_unit_range,
)
from .toy import TOY_DENSITIES, ToyDensity, toy_density

__all__ = [
    "IMAGE_DATASETS",
    "ImageDataset",
    "TOY_DENSITIES",
    "ToyDensity",
    "dequantize",
    "from_unit_range",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_image_array",
    "load_image_dataset",
    "load_image_folder",
    "load_mnist",
    "to_unit_range",
    "toy_density",
]
