r"""Integer pixels and floats in ``[-1, 1]``: trajflow's bin convention for images.

The value range ``[-1, 1]`` is cut into ``levels`` bins of equal width ``2 / levels``; integer ``k`` maps to
the centre of bin ``k``, ``(2k + 1) / levels - 1`` (:func:`to_unit_range`), and uniform dequantisation draws
inside the bin (:func:`dequantize`, re-exported from :mod:`trajflow.likelihood`, which holds the one
implementation). For 8-bit data ``0 -> -1 + 1/256`` and ``255 -> 1 - 1/256``.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = dequantize(torch.tensor([0, 255], dtype=torch.uint8), 256, generator=g)
    >>> bool(x.min() >= -1 and x.max() < 1), from_unit_range(x).tolist()
    (True, [0, 255])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...likelihood import dequantize

__all__ = ["to_unit_range", "from_unit_range", "dequantize"]


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
