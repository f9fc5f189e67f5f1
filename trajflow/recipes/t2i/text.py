"""The frozen text encoder of a run: MiniLM (:class:`~trajflow.text_encoder.TextEncoder`) or, for tests, the
instant :class:`HashingTextEncoder`.

Both have one interface: ``encode(captions) -> (features (B, L, D), mask (B, L))``, ``feature_dim``,
``max_length``, ``device`` and ``to(device)``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from .config import TextConfig

__all__ = ["HashingTextEncoder", "build_text_encoder"]


class HashingTextEncoder:
    """A tiny, instant, deterministic stand-in for the text encoder: **for tests only**.

    Each lower-cased word is hashed (BLAKE2b, so the same on every machine and run) into one of ``buckets``
    rows of a fixed random table, and a sinusoidal position code is added so that word order matters. It
    has the :class:`~trajflow.text_encoder.TextEncoder` interface: ``encode(captions) -> (features (B, L, D),
    mask (B, L))``, ``feature_dim``, ``max_length``. It knows nothing about language; models trained with it
    can only learn word identities.

    Example:
        >>> enc = HashingTextEncoder(dim=8)
        >>> f, m = enc.encode(["a red circle", "a blue square at the top"])
        >>> tuple(f.shape), m.sum(1).tolist()
        ((2, 6, 8), [3, 6])
    """

    def __init__(self, dim: int = 32, *, max_length: int = 48, buckets: int = 4096, seed: int = 0) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even integer >= 2, got {dim!r}")
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(buckets, dim, generator=g)  # (buckets, D)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.positions = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # (L_max, D)
        self._max_length, self.buckets, self._device = max_length, buckets, torch.device("cpu")

    @property
    def feature_dim(self) -> int:
        return self.table.shape[1]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> HashingTextEncoder:
        self._device = torch.device(device)
        return self

    def _ids(self, caption: str) -> list[int]:
        words = caption.lower().replace(",", " ").split()[: self.max_length] or [""]
        digests = (hashlib.blake2b(w.encode(), digest_size=8).digest() for w in words)
        return [int.from_bytes(d, "little") % self.buckets for d in digests]

    def encode(
        self, captions: list[str], *, pooled: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``(features (B, L, D), mask (B, L))`` of ``captions``, padded to the longest (in words); with
        ``pooled`` also the ``(B, D)`` mean-pooled sentence embeddings."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions: expected a list of strings, got {type(captions).__name__}")
        ids = [self._ids(c) for c in captions]
        length = max((len(i) for i in ids), default=0)
        feats = torch.zeros(len(ids), length, self.feature_dim)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for b, row in enumerate(ids):
            feats[b, : len(row)] = self.table[row] + 0.5 * self.positions[: len(row)]
            mask[b, : len(row)] = True
        feats, mask = feats.to(self.device), mask.to(self.device)
        if pooled:
            from ...text_encoder import TextEncoder

            return feats, mask, TextEncoder.mean_pool(feats, mask)
        return feats, mask

    __call__ = encode


def build_text_encoder(config: TextConfig, device: str | torch.device = "cpu") -> Any:
    """The frozen text encoder a :class:`TextConfig` names (MiniLM by default), on ``device``."""
    if config.encoder == "hashing":
        return HashingTextEncoder(config.hashing_dim, max_length=config.max_length).to(device)
    from ...text_encoder import TextEncoder

    return TextEncoder(config.model_path, max_length=config.max_length, device=device, cache=config.cache != "none")
