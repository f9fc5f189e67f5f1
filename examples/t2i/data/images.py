"""Image loading and the transforms shared by the user-data datasets (no torchvision needed).

:func:`load_rgb` decodes a file or bytes into an RGB PIL image (transparent images are composited onto
white, since dropping alpha would expose whatever colour the transparent pixels happen to hold).
:class:`ImageTransform` resizes the shorter side, crops a square (centre or random), flips at random, and
returns a ``(3, H, W)`` float tensor in ``[-1, 1]``.

Example:
    >>> from PIL import Image
    >>> t = ImageTransform(16, crop="center")
    >>> x = t(Image.new("RGB", (40, 20), (255, 0, 0)))
    >>> tuple(x.shape), float(x[0].min()), float(x[1].max())
    ((3, 16, 16), 0.99609375, -0.99609375)
"""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trajflow.data.images import to_unit_range

__all__ = ["load_rgb", "pil_to_tensor", "ImageTransform"]


def load_rgb(source: str | os.PathLike | bytes | IO[bytes], background: tuple[int, int, int] = (255, 255, 255)):
    """Open and fully decode an image as RGB; raises whatever PIL raises on a corrupt or truncated file.

    ``load()`` is called here, not left to the first pixel access, so that a truncated file fails inside the
    caller's ``try`` block instead of later in a transform.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            out = Image.new("RGBA", rgba.size, (*background, 255))
            out.alpha_composite(rgba)
            return out.convert("RGB")
        return im.convert("RGB")


def pil_to_tensor(img: Image.Image) -> Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float tensor in ``[-1, 1]``: 8-bit pixel ``k`` becomes the centre
    of its bin, ``(2k + 1) / 256 - 1``, trajflow's convention (:func:`trajflow.data.images.to_unit_range`), so
    that :func:`~trajflow.data.images.from_unit_range` gives the pixels back exactly."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return to_unit_range(torch.from_numpy(arr.copy()).permute(2, 0, 1))


class ImageTransform:
    """Resize the shorter side to ``size``, crop ``size x size``, maybe flip, return float in ``[-1, 1]``.

    Args:
        size: output side in pixels; ``None`` keeps the image as it is (only converts it).
        crop: ``"center"`` or ``"random"``.
        hflip: probability of a horizontal flip (``True`` means 0.5).
        resample: PIL filter for the resize; bicubic with PIL's built-in antialiasing when shrinking.

    Random choices use torch's global generator, which :class:`torch.utils.data.DataLoader` seeds
    differently in every worker, or ``generator`` when given (a generator is copied into every worker, so
    workers would then repeat each other's crops: leave it ``None`` with worker processes).

    Example:
        >>> from PIL import Image
        >>> t = ImageTransform(8, crop="random", hflip=True)
        >>> t(Image.new("RGB", (30, 12))).shape
        torch.Size([3, 8, 8])
    """

    def __init__(
        self,
        size: int | None,
        *,
        crop: str = "center",
        hflip: bool | float = False,
        resample: int = Image.Resampling.BICUBIC,
        generator: torch.Generator | None = None,
    ) -> None:
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size: expected a positive integer or None, got {size!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop: expected 'center' or 'random', got {crop!r}")
        p = 0.5 if hflip is True else float(hflip)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"hflip: expected a bool or a probability in [0, 1], got {hflip!r}")
        self.size = size
        self.crop = crop
        self.hflip = p
        self.resample = resample
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator)) if high > 1 else 0

    def __call__(self, img: Image.Image) -> Tensor:
        img = img.convert("RGB")
        if self.size is not None:
            w, h = img.size
            scale = self.size / min(w, h)
            # Round up so that the crop never comes out a pixel short on the shorter side.
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), self.resample)
            if self.crop == "center":
                left, top = (nw - self.size) // 2, (nh - self.size) // 2
            else:
                left, top = self._randint(nw - self.size + 1), self._randint(nh - self.size + 1)
            img = img.crop((left, top, left + self.size, top + self.size))
        if self.hflip > 0 and float(torch.rand((), generator=self.generator)) < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop={self.crop!r}, hflip={self.hflip})"
