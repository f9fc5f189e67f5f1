"""Your own images from ``.npy`` / ``.npz`` arrays of 8-bit integers (layout detected or given)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from .dataset import ImageDataset, _dataset_from_numpy
from .pixels import _check_levels

__all__ = ["load_image_array"]

_LAYOUTS = ("NHW", "NHWC", "NCHW")
_CHANNEL_COUNTS = (1, 3, 4)


def _to_nchw(array: np.ndarray, layout: str | None, what: str) -> np.ndarray:
    layout = _layout(array, layout, what)
    if layout == "NHW":
        return array[:, None]
    return array.transpose(0, 3, 1, 2) if layout == "NHWC" else array


def _layout(array: np.ndarray, layout: str | None, what: str) -> str:
    """``layout``, or the layout of ``array`` (3-D: ``NHW``; 4-D: :func:`_guess_layout`), checked against it."""
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {list(_LAYOUTS)} or None, got {layout!r}")
    if array.ndim not in (3, 4):
        raise ValueError(f"{what}: expected a 3-D (NHW) or 4-D (NHWC / NCHW) image array, got shape {array.shape}")
    layout = layout or ("NHW" if array.ndim == 3 else _guess_layout(array, what))
    if len(layout) != array.ndim:
        raise ValueError(f"{what}: layout {layout!r} needs a {len(layout)}-D array, got shape {array.shape}")
    return layout


def _guess_layout(array: np.ndarray, what: str) -> str:
    """``"NHWC"`` or ``"NCHW"`` of a 4-D array, from which axis has a channel count (never both)."""
    last, second = array.shape[3] in _CHANNEL_COUNTS, array.shape[1] in _CHANNEL_COUNTS
    if last == second:
        raise ValueError(f"{what}: cannot tell NHWC from NCHW for shape {array.shape}; pass layout='NHWC' or 'NCHW'")
    return "NHWC" if last else "NCHW"


def _check_8bit(array: np.ndarray, what: str, levels: int) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{what}: expected integer pixels (uint8), got dtype {array.dtype}; trajflow keeps images as integers "
            "for exact bits/dim, so convert floats yourself, e.g. np.round(x * 255).astype(np.uint8) for floats "
            "in [0, 1]"
        )
    if not array.size:
        return array.astype(np.uint8)
    if array.min() < 0 or array.max() > 255:  # wider integer types are fine if the values fit
        raise ValueError(
            f"{what}: expected 8-bit pixels in 0..255, got {array.dtype} values in [{array.min()}, {array.max()}]; "
            "rescale to uint8 before loading"
        )
    if array.max() >= levels:
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
    array, file_labels = _read_arrays(path)
    what = f"images in {path.name}"
    array = _to_nchw(_check_8bit(np.asarray(array), what, levels), layout, what)
    labels = _checked_labels(file_labels if labels is None else labels, array.shape[0])
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels is not None and labels.size else 0
    return _dataset_from_numpy(array, labels, name or path.stem, "", None, levels=levels, num_classes=num_classes)


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of a ``.npy`` / ``.npz`` file and the labels a ``.npz`` holds (``None`` without), unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image array file (expected a .npy or .npz of uint8 images)")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if path.suffix != ".npz":
        raise ValueError(f"path: expected a .npy or .npz file, got {path.name!r}")
    with np.load(path, allow_pickle=False) as z:
        image_key, label_key = _npz_keys(path, list(z.keys()))
        return z[image_key], (z[label_key] if label_key is not None else None)


def _npz_keys(path: Path, keys: list[str]) -> tuple[str, str | None]:
    """The keys of the images (``images``, ``x``, ``data`` or the only array) and of the labels, if any."""
    image_key = _first_of(("images", "x", "data"), keys) or _only(keys)
    if image_key is None:
        raise ValueError(f"{path}: cannot tell which array holds the images among {keys}; name it 'images'")
    return image_key, _first_of(("labels", "y", "targets"), keys)


def _first_of(names: tuple[str, ...], keys: list[str]) -> str | None:
    return next((k for k in names if k in keys), None)


def _only(keys: list[str]) -> str | None:
    return keys[0] if len(keys) == 1 else None


def _checked_labels(labels: np.ndarray | Tensor | Sequence[int] | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise ValueError(f"labels: expected {n} integer labels, got {labels.dtype} of shape {labels.shape}")
    return labels
