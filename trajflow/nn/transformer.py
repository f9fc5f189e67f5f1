r"""Transformer layers shared by the image transporter, predictor and velocity model.

:class:`RotaryEmbedding2D` rotates half of each head's channel pairs with a token's grid row and half with
its column, so :math:`q_i \cdot k_j` depends on positions only through :math:`p_i - p_j`. Tokens off the
grid (class or text prefix tokens) sit at ``(0, 0)``, unrotated: text features already carry their order,
and position 0 makes the result independent of a caption's padding. :class:`Attention` runs
:func:`~torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), causal
or full, with a key padding mask and two caches for token-by-token decoding: :class:`KVCache` (growing
shapes) and :class:`StaticKVCache` (fixed shapes, one CUDA graph can hold a whole decode).

Safe under bf16 autocast: LayerNorm runs in float32, the rotation in float32 cast back, and caches take
the dtype of the keys they receive. Shapes: ``B`` batch, ``L`` tokens, ``nh`` query heads, ``nkv``
key/value heads, ``hd`` head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.torch_version import TorchVersion

from ..checks import check_count, check_number, check_time_features

__all__ = [
    "RotaryEmbedding2D",
    "apply_rotary",
    "KVCache",
    "StaticKVCache",
    "SDPA_HAS_GQA",
    "grouped_attention",
    "Attention",
    "TransformerLayer",
    "Transformer",
    "check_transformer_config",
]

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (L, hd / 2) float32

#: Whether :func:`~torch.nn.functional.scaled_dot_product_attention` takes ``enable_gqa`` (torch >= 2.5):
#: grouped-query attention without materialising repeated keys and values.
SDPA_HAS_GQA: bool = TorchVersion(torch.__version__) >= "2.5"


def check_transformer_config(config: object, counts: tuple[str, ...]) -> None:
    """Raise unless ``config``'s ``counts`` are positive integers, its widths suit :class:`Attention` with 2-D
    RoPE and a sinusoidal time embedding, and its ``scale_bound`` is positive."""
    for name in counts:
        check_count(name, getattr(config, name))
    width, heads, kv_heads = config.width, config.heads, config.kv_heads  # type: ignore[attr-defined]
    if width % heads or (width // heads) % 4:
        raise ValueError(
            f"heads: expected width / heads to be an integer multiple of 4 (2-D RoPE), got width={width}, heads={heads}"
        )
    if kv_heads is not None and (kv_heads < 1 or heads % kv_heads):
        raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
    check_time_features("time_features", config.time_features)  # type: ignore[attr-defined]
    check_number("scale_bound", config.scale_bound, positive=True)  # type: ignore[attr-defined]


class RotaryEmbedding2D(nn.Module):
    r"""2-D rotary embedding: ``positions (L, 2) -> (cos, sin)``, each ``(L, head_dim / 2)`` float32.

    Channel pair ``k < head_dim / 4`` rotates by ``row * base^(-k / (head_dim / 4))``; pair
    ``head_dim / 4 + k`` rotates by the same frequency times ``col``. Apply with :func:`apply_rotary`.

    Arguments:
        head_dim: Channels per head, a multiple of 4.
        base: The longest wavelength, in tokens, is about ``2 pi base``; grids are small, so 100 is plenty.

    Example:
        >>> rope = RotaryEmbedding2D(8)
        >>> cos, sin = rope(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
        >>> cos.shape
        torch.Size([2, 4])
    """

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim < 4 or head_dim % 4:
            raise ValueError(f"head_dim: expected a positive multiple of 4 for 2-D RoPE, got {head_dim}")
        quarter = head_dim // 4
        freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (hd / 4,)
        self.register_buffer("freqs", freqs, persistent=False)
        self.head_dim = head_dim

    def forward(self, positions: Tensor) -> Rope:
        """``positions`` ``(L, 2)`` (row, col) -> ``(cos, sin)``, each ``(L, head_dim / 2)`` float32."""
        pos = positions.float()
        angles = torch.cat([pos[:, :1] * self.freqs, pos[:, 1:2] * self.freqs], dim=-1)  # (L, hd / 2)
        return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: Tensor, rope: Rope) -> Tensor:
    """Rotate channel pairs ``(x[..., k], x[..., hd / 2 + k])`` of ``x`` ``(B, n, L, hd)`` by ``rope``.

    Computed in float32 at least (bf16 rotations lose position information), cast back to ``x.dtype``.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope[0].to(dtype), rope[1].to(dtype)  # (L, hd / 2)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # (B, n, L, hd / 2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values of one attention layer during causal decoding.

    With ``max_len``, buffers ``(B, nkv, max_len, hd)`` allocated on the first :meth:`append` are filled in
    place (no reallocation; without grad only, as in-place writes break backward); without, keys are
    concatenated at each step (autograd-safe).

    Example:
        >>> cache = KVCache(max_len=4)
        >>> k, v = cache.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
        >>> cache.length, k.shape
        (1, torch.Size([1, 2, 1, 8]))
    """

    def __init__(self, max_len: int | None = None) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: Tensor | None = None  # (B, nkv, max_len or length, hd)
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k, v`` ``(B, nkv, n, hd)``; return all keys and values so far, ``(B, nkv, length, hd)``."""
        n = k.shape[2]
        end = self.length + n
        if self.max_len is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            self.length = end
            return self.k, self.v
        if end > self.max_len:
            raise ValueError(f"KVCache: expected at most max_len={self.max_len} tokens, got {end}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class StaticKVCache:
    """Preallocated keys and values of one attention layer, written one token at a time at a device position.

    The zeroed buffers ``(B, nkv, max_len, hd)`` are allocated on the first :meth:`write`, in the keys'
    dtype. :meth:`write` puts the new key/value at slot ``position`` (a ``(1,)`` device tensor, usually
    shared by a stack's layers, that the caller advances in place) and returns the *whole* buffers with the
    mask ``slot <= position``: no Python integer, so every step runs the same kernels on the same shapes
    (one CUDA graph, or one compile). In-place writes: without grad only (sampling).

    Arguments:
        max_len: Slots in the cache (the number of tokens that will be decoded).
        position: ``(1,)`` long tensor, the slot of the next token.

    Example:
        >>> pos = torch.zeros(1, dtype=torch.long)
        >>> cache = StaticKVCache(3, pos)
        >>> k, v, mask = cache.write(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
        >>> k.shape, mask.tolist()
        (torch.Size([1, 2, 3, 8]), [[True, False, False]])
    """

    def __init__(self, max_len: int, position: Tensor) -> None:
        if max_len < 1:
            raise ValueError(f"max_len: expected a positive integer, got {max_len}")
        if position.shape != (1,) or position.dtype != torch.long:
            raise ValueError(
                f"position: expected a (1,) long tensor, got {position.dtype} of shape {tuple(position.shape)}"
            )
        self.max_len = max_len
        self.position = position
        self.slots = torch.arange(max_len, device=position.device)  # (max_len,)
        self.k: Tensor | None = None  # (B, nkv, max_len, hd)
        self.v: Tensor | None = None

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store one token's ``k, v`` ``(B, nkv, 1, hd)`` at ``position``; return the full buffers
        ``(B, nkv, max_len, hd)`` and the key mask ``(1, max_len)``, True for the slots ``<= position``."""
        if k.shape[2] != 1 or v.shape != k.shape:
            raise ValueError(
                f"k, v: a static cache takes one token at a time, shape (B, nkv, 1, hd); got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        elif self.k.shape[:2] != k.shape[:2] or self.k.shape[3] != k.shape[3]:
            raise ValueError(f"k: expected shape {(*self.k.shape[:2], 1, self.k.shape[3])}, got {tuple(k.shape)}")
        self.k.index_copy_(2, self.position, k.to(self.k.dtype))
        self.v.index_copy_(2, self.position, v.to(self.v.dtype))
        return self.k, self.v, (self.slots <= self.position)[None]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA of ``q`` ``(B, nh, L, hd)`` over ``k, v`` ``(B, nkv, L_keys, hd)`` (``nkv`` divides ``nh``) under
    a bool ``mask`` broadcastable to ``(B, nh, L, L_keys)`` (True = attend); ``(B, nh, L, hd)``. Grouped keys
    are not copied where torch has ``enable_gqa`` (:data:`SDPA_HAS_GQA`)."""
    nh, nkv = q.shape[1], k.shape[1]
    if nh == nkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query heads, RoPE, masks and a KV cache.

    Arguments:
        width: Model width; ``width / heads`` is the head dim.
        heads: Query heads.
        kv_heads: Key/value heads (divides ``heads``); ``None`` means ``heads`` (no grouping).
    """

    def __init__(self, width: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if width % heads:
            raise ValueError(f"heads: expected a divisor of width={width}, got {heads}")
        if heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        *,
        causal: bool = False,
        key_mask: Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> Tensor:
        """The new tokens ``x`` ``(B, L, width)`` -> ``(B, L, width)``.

        Arguments:
            rope: ``(cos, sin)`` of the new tokens' positions, each ``(L, hd / 2)``.
            causal: Token ``i`` attends to tokens ``<= i`` (counting the cached ones before it).
            key_mask: ``(B, L_keys)`` bool, True for keys that may be attended (padding is False).
            cache: Keys/values of earlier tokens; the new ones are appended. With a
                :class:`StaticKVCache`, ``x`` is one token ``(B, 1, width)``, attention is causal by the
                cache's mask, and ``key_mask`` must be ``None``.
        """
        b, n, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(b, n, self.heads, hd).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(b, n, self.kv_heads, hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = v.view(b, n, self.kv_heads, hd).transpose(1, 2)  # (B, nkv, L, hd)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if isinstance(cache, StaticKVCache):
            if key_mask is not None:
                raise ValueError("key_mask: not supported with a StaticKVCache (causal decoding only)")
            k, v, mask = cache.write(k, v)  # (B, nkv, max_len, hd), (1, max_len)
            out = grouped_attention(q, k, v, mask)  # (B, nh, 1, hd)
        else:
            out = self._attend(q, k, v, causal, key_mask, cache)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * hd))

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """SDPA of ``q`` ``(B, nh, L, hd)`` over the cached and new keys; ``(B, nh, L, hd)``."""
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.append(k, v)  # (B, nkv, offset + L, hd)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, nh, L_keys, hd)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask, is_causal = self._mask(q.shape[2], k.shape[2], offset, causal, key_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    @staticmethod
    def _mask(
        n: int, n_keys: int, offset: int, causal: bool, key_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """A boolean mask broadcastable to ``(B, nh, L, L_keys)`` (True = attend), or SDPA's causal flag."""
        if causal and key_mask is None and offset == 0:
            return None, True  # the fused kernels' own causal mask
        mask = None
        if causal and n > 1:  # one new token attends to every cached key: no mask needed
            rows = torch.arange(n, device=device)[:, None] + offset  # absolute query positions
            mask = rows >= torch.arange(n_keys, device=device)[None, :]  # (L, L_keys)
        if key_mask is not None:
            km = key_mask[:, None, None, :]  # (B, 1, 1, L_keys)
            mask = km if mask is None else mask & km
        return mask, False


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` with a 4x GELU MLP."""

    def __init__(self, width: int, heads: int, kv_heads: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, kv_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, rope: Rope | None = None, **attention: Any) -> Tensor:
        """``(B, L, width) -> (B, L, width)``; the keyword arguments are those of :meth:`Attention.forward`."""
        x = x + self.attn(self.norm1(x), rope, **attention)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerLayer` (no final norm: the models add their own before a head).

    Arguments:
        width: Model width.
        depth: Number of layers.
        heads: Query heads.
        kv_heads: Key/value heads (grouped-query attention), ``None`` for ``heads``.

    Example:
        >>> net = Transformer(16, depth=2, heads=2)
        >>> net(torch.randn(3, 5, 16), causal=True).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, width: int, depth: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, kv_heads) for _ in range(depth))

    def make_caches(self, max_len: int | None = None) -> list[KVCache]:
        """One empty :class:`KVCache` per layer (static if ``max_len`` is given, else growing)."""
        return [KVCache(max_len) for _ in self.layers]

    def make_static_caches(self, max_len: int, position: Tensor) -> list[StaticKVCache]:
        """One :class:`StaticKVCache` of ``max_len`` slots per layer, all sharing ``position`` ``(1,)``."""
        return [StaticKVCache(max_len, position) for _ in self.layers]

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        *,
        causal: bool = False,
        key_mask: Tensor | None = None,
        caches: list[KVCache] | list[StaticKVCache] | None = None,
    ) -> Tensor:
        """``(B, L, width) -> (B, L, width)``; ``caches`` from :meth:`make_caches` or
        :meth:`make_static_caches` for decoding."""
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, causal=causal, key_mask=key_mask, cache=None if caches is None else caches[i])
        return x
