r"""The image transporter: a TarFlow-style stack of causal autoregressive affine flow blocks.

An image ``(C, H, W)`` is cut into ``L`` patch tokens of ``D = C p^2`` channels (raster order). Each
block :math:`\ell` first permutes the tokens (identity for even blocks, a flip for odd ones), then maps

.. math::

    u_i = (x_i - \mu_i(x_{<i}, t)) / \sigma_i(x_{<i}, t), \qquad
    \log |\det \partial u / \partial x| = -\sum_{i, d} \log \sigma_{i, d},

where :math:`(\mu_i, \sigma_i)` come from a causal transformer run over tokens :math:`0..i-1` (token 0
passes through unchanged). Inside a block: ``proj_in`` to the model width, plus an embedding of the
level's time :math:`t` (sinusoidal -> MLP) added to every token, causal layers with 2-D RoPE over the
patch grid (a token keeps its grid position when the order is flipped), a final LayerNorm and a
**zero-initialised** head to ``2 D`` channels, so every block, and the transporter, starts as the identity.

The head's output at token ``i`` parameterises token ``i + 1`` (the "shift right by one" of TarFlow), so
a forward pass needs one parallel causal pass per block, and the inverse decodes token by token with a
KV cache (:meth:`TransformerTransporter.inverse`), blocks in reverse order. The inverse has four methods:

* ``"kv-cache"`` (default): a growing (with grad) or preallocated (without) cache, sliced by Python
  position; autograd-safe, the reference path on CPU.
* ``"static"``: a :class:`~trajflow.nn.transformer.StaticKVCache` written at a position held in a device
  tensor, attention over the whole preallocated cache under a mask. Every token step has the same shapes
  and kernels. No gradient flows through it (sampling only).
* ``"graph"``: the static decode of every block captured once per batch size in a CUDA graph and
  replayed (:class:`~trajflow.transporters.static_inverse.StaticCacheInverse`); CUDA only.
* ``"naive"``: recompute the full causal pass at every token (a slow reference).

References: NTM-v2 section 3.2 / App. A.1 (2 blocks, alternating scan, 2-D RoPE); TarFlow (Zhai et al.,
2025); STARFlow's soft-clipped softplus scale (Gu et al., 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_times
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.patches import PatchedImageConfig, check_images, patch_grid, patchify, unpatchify
from ..nn.scale import positive_scale
from ..nn.transformer import Rope, RotaryEmbedding2D, Transformer, check_attention_dims
from .base import Transporter

__all__ = ["TransformerTransporterConfig", "TransformerTransporter", "INVERSE_METHODS"]

#: The methods of :meth:`TransformerTransporter.inverse` (see the module docstring).
INVERSE_METHODS = ("kv-cache", "static", "graph", "naive")


@dataclass
class TransformerTransporterConfig(PatchedImageConfig):
    r"""Hyper-parameters of :class:`TransformerTransporter`.

    Attributes:
        image_shape: ``(C, H, W)`` of one data point (e.g. a latent).
        patch_size: Side ``p`` of the square patches; ``H`` and ``W`` must be multiples of it.
        width: Transformer width.
        heads: Attention heads; ``width / heads`` must be a multiple of 4 (2-D RoPE).
        kv_heads: Key/value heads for grouped-query attention (``None``: same as ``heads``).
        layers_per_block: Causal transformer layers in each flow block.
        blocks: Flow blocks; their scan order alternates identity / flip.
        time_features: Size of the sinusoidal embedding of ``t`` (before the MLP to ``width``).
        scale_bound: Soft-clip bound ``a`` of the raw log-scale (see :func:`~trajflow.nn.positive_scale`).
            Each block's :math:`\sigma` lies in ``(softplus(0.54 - a), softplus(a + 0.54))``; the default 6
            gives about ``(0.0043, 6.5)``, so one block can resolve finer than the 2/256 bin (0.0078) of
            8-bit data in [-1, 1] while a bad step cannot blow the log-determinant up.
        rope_base: Base of the RoPE frequencies.
        validate_args: Check shapes and that ``t`` is finite and in [0, 1] (the time check synchronises
            a GPU; switch it off in a tuned training loop).
    """

    width: int = 256
    heads: int = 4
    kv_heads: int | None = None
    layers_per_block: int = 4
    blocks: int = 2
    time_features: int = 128
    scale_bound: float = 6.0
    rope_base: float = 100.0
    validate_args: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("width", "heads", "layers_per_block", "blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        check_attention_dims(self.width, self.heads, self.kv_heads, self.time_features)
        if not self.scale_bound > 0:
            raise ValueError(f"scale_bound: expected a positive bound, got {self.scale_bound}")


class AffineFlowBlock(nn.Module):
    """One causal affine autoregressive block over a token sequence (see the module docstring).

    Works on patch tokens ``(N, L, D)`` with a precomputed time embedding ``(N, time_features)`` and the
    RoPE tables ``(cos, sin)`` of the grid in raster order; the block permutes tokens and tables itself.
    """

    def __init__(self, config: TransformerTransporterConfig, flip: bool) -> None:
        super().__init__()
        d, width = config.token_dim, config.width
        self.flip = flip
        self.scale_bound = config.scale_bound
        self.proj_in = nn.Linear(d, width)
        self.time_mlp = nn.Sequential(
            nn.Linear(config.time_features, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.layers = Transformer(width, config.layers_per_block, config.heads, config.kv_heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2 * d)
        # Zero head: mu = 0 and sigma = positive_scale(0) = 1 for every token, i.e. the identity.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _order(self, z: Tensor) -> Tensor:
        """Apply the block's scan order along dim -2 (a flip is its own inverse)."""
        return z.flip(-2) if self.flip else z

    def _affine(self, h: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Hidden states ``(N, n, width)`` -> ``(mu, sigma)`` ``(N, n, D)`` of the next tokens."""
        raw = self.head(self.norm(h))  # (N, n, 2D), bf16 under autocast
        mu, raw_scale = raw.chunk(2, dim=-1)
        # sigma in float32 at least: it feeds the log-determinant.
        return mu.to(dtype), positive_scale(raw_scale, self.scale_bound).to(dtype)

    def params(self, z: Tensor, temb: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` ``(N, L, D)`` for tokens ``z`` ``(N, L, D)`` already in scan order.

        One causal pass over tokens ``0..L-2``: its output at token ``i`` gives token ``i + 1``'s
        parameters, and token 0 gets exactly ``mu = 0, sigma = 1``.
        """
        n, length, d = z.shape
        dtype = torch.promote_types(z.dtype, torch.float32)
        mu0, sigma0 = z.new_zeros(n, 1, d, dtype=dtype), z.new_ones(n, 1, d, dtype=dtype)
        if length == 1:
            return mu0, sigma0
        cos, sin = rope
        h = self.proj_in(z[:, :-1]) + temb[:, None]  # (N, L - 1, width)
        h = self.layers(h, (cos[:-1], sin[:-1]), causal=True)
        mu, sigma = self._affine(h, dtype)  # (N, L - 1, D)
        return torch.cat([mu0, mu], dim=1), torch.cat([sigma0, sigma], dim=1)

    def time_embedding(self, emb: Tensor) -> Tensor:
        """Sinusoidal features ``(N, time_features)`` -> ``(N, width)``."""
        return self.time_mlp(emb.to(self.proj_in.weight.dtype))

    def forward(self, x: Tensor, emb: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """Tokens ``x`` ``(N, L, D)`` in raster order -> ``(u (N, L, D), ladj (N,))``."""
        rope = (self._order(rope[0]), self._order(rope[1]))
        z = self._order(x)
        mu, sigma = self.params(z, self.time_embedding(emb), rope)
        u = (z.to(mu.dtype) - mu) / sigma
        ladj = -torch.log(sigma).sum(dim=(1, 2))  # exact sum over tokens and channels, no mean
        return self._order(u), ladj

    def inverse(self, u: Tensor, emb: Tensor, rope: Rope, *, naive: bool = False) -> Tensor:
        """Tokens ``u`` ``(N, L, D)`` -> ``x``, decoded one token at a time in scan order.

        With ``naive=False`` each step runs one token through the layers with a KV cache (static without
        grad, growing with grad); with ``naive=True`` each step recomputes the full causal pass.
        """
        rope = (self._order(rope[0]), self._order(rope[1]))
        z = self._order(u)
        n, length, _ = z.shape
        temb = self.time_embedding(emb)
        dtype = torch.promote_types(z.dtype, torch.float32)
        xs = [z[:, 0].to(dtype)]  # token 0 is untouched; a list keeps decoding autograd-friendly
        if naive:
            for i in range(1, length):
                seq = torch.cat([torch.stack(xs, dim=1), z[:, i:].to(dtype)], dim=1)  # (N, L, D)
                mu, sigma = self.params(seq, temb, rope)
                xs.append(z[:, i] * sigma[:, i] + mu[:, i])
        else:
            caches = self.layers.make_caches(None if torch.is_grad_enabled() else length - 1)
            cos, sin = rope
            for i in range(length - 1):
                h = self.proj_in(xs[i][:, None]) + temb[:, None]  # (N, 1, width)
                h = self.layers(h, (cos[i : i + 1], sin[i : i + 1]), causal=True, caches=caches)
                mu, sigma = self._affine(h, dtype)  # (N, 1, D): parameters of token i + 1
                xs.append(z[:, i + 1] * sigma[:, 0] + mu[:, 0])
        return self._order(torch.stack(xs, dim=1))

    def inverse_static(self, u: Tensor, emb: Tensor, rope: Rope) -> Tensor:
        """The same as :meth:`inverse` with a :class:`~trajflow.nn.transformer.StaticKVCache`; fixed shapes.

        Tokens ``u`` ``(N, L, D)`` -> ``x`` ``(N, L, D)`` (float32 at least). The decoded tokens are written
        in place into one ``(N, L, D)`` buffer at ``position + 1``, where ``position`` is a ``(1,)`` device
        tensor advanced in place, so the ``L - 1`` steps launch identical kernels on identical shapes (one
        CUDA graph can hold the whole loop). In-place writes: call it without grad.
        """
        rope = (self._order(rope[0]), self._order(rope[1]))
        dtype = torch.promote_types(u.dtype, torch.float32)
        out = self._order(u).to(dtype).clone()  # (N, L, D): token 0 is final, token i > 0 is replaced in turn
        n, length, _ = out.shape
        if length == 1:
            return self._order(out)
        temb = self.time_embedding(emb)[:, None]  # (N, 1, width)
        position = torch.zeros(1, dtype=torch.long, device=out.device)  # the token fed at this step
        caches = self.layers.make_static_caches(length - 1, position)
        cos, sin = rope
        for _ in range(length - 1):
            h = self.proj_in(out.index_select(1, position)) + temb  # (N, 1, width)
            step_rope = (cos.index_select(0, position), sin.index_select(0, position))  # (1, hd / 2) each
            h = self.layers(h, step_rope, causal=True, caches=caches)
            mu, sigma = self._affine(h, dtype)  # (N, 1, D): parameters of the next token
            nxt = position + 1
            out.index_copy_(1, nxt, out.index_select(1, nxt) * sigma + mu)
            position.add_(1)
        return self._order(out)


class TransformerTransporter(Transporter):
    r"""TarFlow-style transporter :math:`u = f_T(x, t)` for images / latents ``(C, H, W)``.

    ``forward(x, t)`` takes ``x`` ``(*batch, C, H, W)`` and ``t`` ``batch`` (in [0, 1]) and returns ``u`` of
    ``x``'s shape and the exact log-determinant ``(*batch,)`` (float32, or float64 for float64 inputs),
    summed over every dimension of the sample. Each block is the identity at initialisation.

    ``inverse(u, t, method=None)`` decodes token by token; ``method`` is one of :data:`INVERSE_METHODS`
    (see the module docstring) and defaults to the attribute :attr:`inverse_method`, ``"kv-cache"``. Set
    ``transporter.inverse_method = "graph"`` (CUDA) or ``"static"`` to make every caller (e.g.
    :meth:`~trajflow.TrajectoryDistribution.decode`) use that path.

    Arguments:
        config: A :class:`TransformerTransporterConfig`.

    Example:
        >>> cfg = TransformerTransporterConfig((1, 4, 4), patch_size=2, width=16, heads=2, layers_per_block=1)
        >>> f = TransformerTransporter(cfg)
        >>> x, t = torch.randn(3, 1, 4, 4), torch.rand(3)
        >>> u, ladj = f(x, t)
        >>> torch.allclose(f.inverse(u, t), x), ladj.shape
        (True, torch.Size([3]))
        >>> with torch.no_grad():
        ...     torch.allclose(f.inverse(u, t, method="static"), x)
        True
    """

    #: The default method of :meth:`inverse` (one of :data:`INVERSE_METHODS`).
    inverse_method: str = "kv-cache"

    def __init__(self, config: TransformerTransporterConfig) -> None:
        super().__init__()
        self.config = config
        self.event_shape = torch.Size(config.image_shape)
        _, h, w = config.image_shape
        self.time_embedding = SinusoidalEmbedding(config.time_features)
        self.rope = RotaryEmbedding2D(config.width // config.heads, config.rope_base)
        self.register_buffer("positions", patch_grid(h, w, config.patch_size), persistent=False)  # (L, 2)
        self.blocks = nn.ModuleList(AffineFlowBlock(config, flip=i % 2 == 1) for i in range(config.blocks))

    def _prepare(self, name: str, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
        """Validate and flatten: ``x`` -> tokens ``(N, L, D)``, ``t`` -> embedding ``(N, F)``, batch shape."""
        check_images(name, x, self.event_shape)
        self.check_input(name, x, t)
        if self.config.validate_args:
            check_times("t", t)
        batch = x.shape[:-3]
        tokens = patchify(x.reshape(-1, *self.event_shape), self.config.patch_size)  # (N, L, D)
        return tokens, self.time_embedding(t.reshape(-1).to(x.device)), batch

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, ladj)`` with ``u = f_T(x, t)`` of ``x.shape`` and ``ladj`` of shape ``batch``."""
        z, emb, batch = self._prepare("x", x, t)
        rope = self.rope(self.positions)
        ladj = z.new_zeros(z.shape[0], dtype=torch.promote_types(z.dtype, torch.float32))
        for block in self.blocks:
            z, block_ladj = block(z, emb, rope)
            ladj = ladj + block_ladj
        u = unpatchify(z, self.config.patch_size, self.event_shape).reshape(x.shape)
        return u, ladj.reshape(batch)

    def _invert(self, u: Tensor, t: Tensor, naive: bool) -> Tensor:
        z, emb, _ = self._prepare("u", u, t)
        rope = self.rope(self.positions)
        for block in reversed(self.blocks):
            z = block.inverse(z, emb, rope, naive=naive)
        return unpatchify(z, self.config.patch_size, self.event_shape).reshape(u.shape)

    def decode_static(self, z: Tensor, emb: Tensor) -> Tensor:
        """Tokens ``z`` ``(N, L, D)`` and time features ``emb`` ``(N, time_features)`` -> decoded tokens.

        Every block's :meth:`AffineFlowBlock.inverse_static`, in reverse order: no argument checks and no
        host synchronisation, fixed shapes for a given ``N`` (what a CUDA graph captures). Without grad.
        """
        rope = self.rope(self.positions)
        for block in reversed(self.blocks):
            z = block.inverse_static(z, emb, rope)
        return z

    def inverse(self, u: Tensor, t: Tensor, *, method: str | None = None) -> Tensor:
        """``x = f_T^{-1}(u, t)``: token-by-token decoding, blocks in reverse order.

        Costs ``L - 1`` one-token passes per block.

        Arguments:
            u: ``(*batch, C, H, W)``.
            t: ``batch``, in [0, 1].
            method: ``"kv-cache"`` (autograd-safe; under :func:`torch.no_grad` the cache is preallocated),
                ``"static"`` (fixed-shape static cache, any device), ``"graph"`` (the static decode replayed
                from a CUDA graph captured per batch size and dtype; CUDA only) or ``"naive"``; ``None``
                uses :attr:`inverse_method`. ``"static"`` and ``"graph"`` run without grad: they raise if
                ``u`` or ``t`` requires grad while grad mode is on, and give no gradient to the parameters.

        Returns:
            ``x`` of ``u``'s shape (float32, or float64 for float64 inputs).
        """
        method = self.inverse_method if method is None else method
        if method not in INVERSE_METHODS:
            raise ValueError(f"method: expected one of {list(INVERSE_METHODS)} or None, got {method!r}")
        if method == "kv-cache":
            return self._invert(u, t, naive=False)
        if method == "naive":
            return self._invert(u, t, naive=True)
        from .static_inverse import graphed_inverse  # noqa: PLC0415 (the helper imports this module)

        if method == "graph":
            return graphed_inverse(self)(u, t)
        _check_no_grad(u, t, method)
        z, emb, _ = self._prepare("u", u, t)
        with torch.no_grad():
            z = self.decode_static(z, emb)
        return unpatchify(z, self.config.patch_size, self.event_shape).reshape(u.shape)

    def inverse_naive(self, u: Tensor, t: Tensor) -> Tensor:
        """The same as :meth:`inverse`, recomputing the full causal pass at every token (a reference)."""
        return self._invert(u, t, naive=True)


def _check_no_grad(u: Tensor, t: Tensor, method: str) -> None:
    """Raise if a gradient is asked of a static-cache inverse (in-place cache writes; sampling only)."""
    if torch.is_grad_enabled() and (u.requires_grad or t.requires_grad):
        raise ValueError(
            f"u: method={method!r} has no gradient (in-place static cache), but u or t requires grad; "
            "use method='kv-cache' to differentiate through the inverse, or run under torch.no_grad()"
        )
