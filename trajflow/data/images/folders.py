"""Your own images from a folder of PNG / JPEG files, optionally one subfolder per class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import ImageDataset, _dataset_from_numpy

__all__ = ["load_image_folder"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """The visible image files in and below ``folder`` (none in hidden folders), sorted."""
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not any(part.startswith(".") for part in p.parts))


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
    root = Path(path)
    size = _check_arguments(root, size, channels)
    files, class_names = _labelled_files(root)
    opened = _open_8bit(files)
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1") for im in opened) else 3
    images = _pixels(files, opened, channels, size)
    labels = np.array([label for _, label in files], dtype=np.int64)
    num_classes = len(class_names or ())
    return _dataset_from_numpy(images, labels, name or root.name, "", class_names, num_classes=num_classes)


def _check_arguments(root: Path, size: int | tuple[int, int] | None, channels: int | None) -> tuple[int, int] | None:
    """Raise unless ``root`` is a folder and ``size`` / ``channels`` are valid; ``size`` as ``(H, W)`` or None."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected a folder of PNG/JPEG images)")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1, 3 or None, got {channels!r}")
    return None if size is None else _checked_size(size)


def _checked_size(size: int | tuple[int, int]) -> tuple[int, int]:
    size = (size, size) if isinstance(size, int) else size
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size: expected a positive int or (H, W), got {size!r}")
    return size


def _class_dirs(root: Path) -> list[Path]:
    """The visible subfolders of ``root`` that hold images, sorted by name; an error if images lie beside them."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d))
    loose = list(filter(_is_image, root.iterdir()))
    if class_dirs and loose:
        raise ValueError(
            f"{root}: has both class subfolders ({[d.name for d in class_dirs]}) and loose images "
            f"({loose[0].name}, ...); move the loose images into a class folder or remove them"
        )
    return class_dirs


def _labelled_files(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...] | None]:
    """``[(file, label)]`` in reading order and the class names (``None``: an unlabelled folder)."""
    class_dirs = _class_dirs(root)
    files = [(f, label) for label, d in enumerate(class_dirs or [root]) for f in _image_files(d)]
    if not files:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(_IMAGE_SUFFIXES)}) found")
    return files, tuple(d.name for d in class_dirs) or None


def _open_8bit(files: list[tuple[Path, int]]) -> list[Image.Image]:
    """Every file read into memory; a file that is not 8-bit is refused by name."""
    opened = []
    for file, _ in files:
        with Image.open(file) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{file}: mode {im.mode!r} is not 8-bit; convert it to 8-bit first")
            opened.append(im.copy())
    return opened


def _converted(im: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``(H, W)`` or ``(H, W, 3)``, resized to ``size`` with a Lanczos filter."""
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def _pixels(
    files: list[tuple[Path, int]], opened: list[Image.Image], channels: int, size: tuple[int, int] | None
) -> np.ndarray:
    """The images as one uint8 array ``(N, C, H, W)``, converted to ``channels`` and resized to ``size``."""
    arrays = [_converted(im, channels, size) for im in opened]
    for (file, _), a in zip(files, arrays, strict=True):
        if a.shape != arrays[0].shape:
            raise ValueError(
                f"{file}: size {a.shape[:2]} differs from {arrays[0].shape[:2]} of {files[0][0].name}; "
                "pass size= to resize"
            )
    images = np.stack(arrays)
    return images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
