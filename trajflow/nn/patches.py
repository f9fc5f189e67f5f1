r"""Images as token sequences: patchify, unpatchify, the patch grid, and image-shape checks.

An image ``(C, H, W)`` cut into non-overlapping ``p x p`` patches becomes ``L = (H / p)(W / p)`` tokens
of ``C p^2`` channels, in raster order (row by row, left to right). Inside a token the channels are
ordered ``(c, dy, dx)``, the order of :func:`torch.nn.functional.unfold`. Any leading dims are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ..checks import check_tensor

__all__ = [
    "patchify",
    "unpatchify",
    "patch_grid",
    "check_images",
    "check_image_config",
    "PatchedImageConfig",
    "default_layout",
    "token_dim",
    "num_tokens",
    "hidden_shape",
    "to_tokens",
    "from_tokens",
]


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(*, C, H, W) -> (*, L, C p^2)`` with ``L = (H / p)(W / p)`` tokens in raster order.

    Example:
        >>> patchify(torch.zeros(2, 3, 4, 6), 2).shape
        torch.Size([2, 6, 12])
    """
    return rearrange(x, "... c (h p) (w q) -> ... (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens: Tensor, patch_size: int, image_shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`patchify`: ``(*, L, C p^2) -> (*, C, H, W)``.

    Example:
        >>> x = torch.randn(2, 3, 4, 6)
        >>> torch.equal(unpatchify(patchify(x, 2), 2, (3, 4, 6)), x)
        True
    """
    _, height, _ = image_shape
    return rearrange(
        tokens, "... (h w) (c p q) -> ... c (h p) (w q)", h=height // patch_size, p=patch_size, q=patch_size
    )


def patch_grid(height: int, width: int, patch_size: int) -> Tensor:
    """The ``(row, col)`` of every token of a patchified ``height x width`` image: ``(L, 2)`` float32.

    Example:
        >>> patch_grid(4, 4, 2).tolist()
        [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    rows = torch.arange(height // patch_size, dtype=torch.float32)
    cols = torch.arange(width // patch_size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (h, w, 2)
    return grid.reshape(-1, 2)


def check_images(name: str, x: Tensor, image_shape: Sequence[int], *, flat: bool = False) -> Tensor:
    """Raise a :class:`ValueError` unless ``x`` is a floating ``(*batch, C, H, W)`` batch of images.

    The message says whether the channel count or the spatial size is wrong. With ``flat=True`` exactly
    one batch dim is required: ``(N, C, H, W)``.
    """
    check_tensor(name, x)
    channels, height, width = image_shape
    if x.dim() < 3 or (flat and x.dim() != 4):
        want = "(N, C, H, W)" if flat else "(*batch, C, H, W)"
        raise ValueError(
            f"{name}: expected images of shape {want} with (C, H, W) = {tuple(image_shape)}, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    if x.shape[-3] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels (dim -3 of {tuple(image_shape)} images), "
            f"got {x.shape[-3]} in shape {tuple(x.shape)}"
        )
    if tuple(x.shape[-2:]) != (height, width):
        raise ValueError(
            f"{name}: expected images of size {height}x{width}, got {x.shape[-2]}x{x.shape[-1]} "
            f"in shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_image_config(image_shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Validate an image model's ``(C, H, W)`` and patch size (a divisor of H and W); return the shape."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape: expected positive (C, H, W), got {shape}")
    _, h, w = shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size: expected a positive divisor of H={h} and W={w}, got {patch_size}")
    return shape  # type: ignore[return-value]


@dataclass
class PatchedImageConfig:
    """The part of a transformer's config that fixes its tokens: an image ``(C, H, W)`` cut into ``p x p`` patches.

    Subclasses (the transporter's and the predictor's configs) add their own fields and call
    ``super().__post_init__()``.
    """

    image_shape: tuple[int, int, int]
    patch_size: int = 1

    def __post_init__(self) -> None:
        self.image_shape = check_image_config(self.image_shape, self.patch_size)

    @property
    def token_dim(self) -> int:
        """Channels per token, ``C p^2``."""
        return self.image_shape[0] * self.patch_size**2

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``(H / p)(W / p)``."""
        return self.image_shape[1] * self.image_shape[2] // self.patch_size**2


# -- data of any event shape as tokens: images as patches, sequences (L, C) as they are ------------------


def default_layout(event_shape: torch.Size) -> str:
    """``"flat"`` hidden states ``(N, F)`` for vectors, ``"tokens"`` ``(N, L, F)`` for images/sequences."""
    return "flat" if len(event_shape) == 1 else "tokens"


def token_dim(event_shape: torch.Size, patch_size: int) -> int:
    """Channels per token: ``C p^2`` for ``(C, H, W)`` images, ``C`` for ``(L, C)`` sequences."""
    if len(event_shape) == 3:
        return event_shape[0] * patch_size**2
    if len(event_shape) == 2:
        return event_shape[1]
    raise ValueError(f"hidden_layout: 'tokens' needs a (L, C) or (C, H, W) event shape, got {tuple(event_shape)}")


def num_tokens(event_shape: torch.Size, patch_size: int) -> int:
    if len(event_shape) == 3:
        return event_shape[1] * event_shape[2] // patch_size**2
    return event_shape[0]


def hidden_shape(layout: str, n: int, event_shape: torch.Size, patch_size: int, features: int) -> tuple[int, ...]:
    """The shape of ``n`` hidden states of width ``features``: ``(n, F)`` (``"flat"``) or ``(n, L, F)``."""
    return (n, features) if layout == "flat" else (n, num_tokens(event_shape, patch_size), features)


def to_tokens(x: Tensor, event_shape: torch.Size, patch_size: int) -> Tensor:
    """``(N, *event) -> (N, L, token_dim)``."""
    return patchify(x, patch_size) if len(event_shape) == 3 else x


def from_tokens(tokens: Tensor, event_shape: torch.Size, patch_size: int) -> Tensor:
    """``(N, L, token_dim) -> (N, *event)``; the inverse of :func:`to_tokens`."""
    return unpatchify(tokens, patch_size, event_shape) if len(event_shape) == 3 else tokens
