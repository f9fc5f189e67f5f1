r"""The image transporter: a TarFlow-style stack of causal autoregressive affine flow blocks.

An image ``(C, H, W)`` is cut into ``L`` patch tokens of ``D = C p^2`` channels (raster order). Each
block :math:`\ell` first permutes the tokens (identity for even blocks, a flip for odd ones), then maps

.. math::

    u_i = (x_i - \mu_i(x_{<i}, t)) / \sigma_i(x_{<i}, t), \qquad
    \log |\det \partial u / \partial x| = -\sum_{i, d} \log \sigma_{i, d},

where :math:`(\mu_i, \sigma_i)` come from a causal transformer over tokens :math:`0..i-1` (token 0 passes
unchanged; the output at token ``i`` parameterises token ``i + 1``, TarFlow's "shift right by one"). Inside
a block: ``proj_in`` to the width plus an embedding of the level's time :math:`t` on every token, causal
layers with 2-D RoPE over the patch grid (a token keeps its position when the order flips), a LayerNorm and
a **zero-initialised** head to ``2 D`` channels, so every block, and the transporter, starts as the identity.

**Conditioning (optional).** With ``num_classes`` or ``text_features``, the transporter is
:math:`f_T(x, t, y)`: a context vector of :math:`y` (a class embedding, or text mean-pooled over its valid
tokens then ``Linear -> SiLU``) goes through each block's **zero-initialised** bias-free ``cond_proj`` into
its time embedding. A dropped condition (``drop_cond``) has the null context 0, i.e. the unconditional map.
:math:`y` changes only :math:`(\mu_i, \sigma_i)`, so log-determinants stay exact.

A forward pass is one parallel causal pass per block; the inverse decodes token by token, blocks in reverse:

* ``"kv-cache"`` (default): a growing (with grad) or preallocated (without) cache; the reference path.
* ``"static"``: a :class:`~trajflow.nn.transformer.StaticKVCache` at a device-tensor position, the same
  shapes and kernels at every token; no gradient (sampling only).
* ``"graph"``: the static decode captured once per batch size in a CUDA graph and replayed
  (:class:`~trajflow.transporters.static_inverse.StaticCacheInverse`); CUDA only.
* ``"naive"``: the full causal pass recomputed at every token (a slow reference).

References: NTM-v2 section 3.2 / App. A.1 (2 blocks, alternating scan, 2-D RoPE); TarFlow (Zhai et al.,
2025); STARFlow's soft-clipped softplus scale (Gu et al., 2025).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_times
from ..conditioning import Condition, align_cond
from ..nn.config import DataclassPretrained
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.patches import check_images, patch_grid, patchify, unpatchify
from ..nn.transformer import RotaryEmbedding2D
from .affine_blocks import AffineFlowBlock, TransformerTransporterConfig, TransporterCondition
from .base import Transporter
from .static_inverse import check_no_grad, graphed_inverse

__all__ = ["TransformerTransporterConfig", "TransformerTransporter", "TransporterCondition", "INVERSE_METHODS"]

#: The methods of :meth:`TransformerTransporter.inverse` (see the module docstring).
INVERSE_METHODS = ("kv-cache", "static", "graph", "naive")


class TransformerTransporter(DataclassPretrained, Transporter):
    r"""TarFlow-style transporter :math:`u = f_T(x, t[, y])` for images / latents ``(C, H, W)``.

    ``forward(x, t, cond=None, drop_cond=None)`` takes ``x`` ``(*batch, C, H, W)`` and ``t`` ``batch`` (in
    [0, 1]) and returns ``u`` of ``x``'s shape and the exact log-determinant ``(*batch,)`` (float32, or
    float64 for float64 inputs). ``inverse(u, t, cond=None, drop_cond=None, method=None)`` decodes token by
    token; ``method`` defaults to :attr:`inverse_method` (set it to ``"graph"`` or ``"static"`` to make every
    caller, e.g. :meth:`~trajflow.TrajectoryDistribution.decode`, use that path).

    A conditional config takes class indices ``batch`` (long) or text ``(features (*batch, L, text_features),
    mask (*batch, L))`` and ``drop_cond`` ``batch`` (bool, True = null context); ``cond=None`` is the null
    context everywhere. Unconditional configs ignore both. The condition is checked where it enters
    (:class:`~trajflow.TrajectoryDistribution`, against :attr:`cond_spec`), not here.

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

    #: The default method of :meth:`inverse` (one of :data:`INVERSE_METHODS`); a run-time choice, not saved.
    inverse_method: str = "kv-cache"
    config_class = TransformerTransporterConfig

    def __init__(self, config: TransformerTransporterConfig) -> None:
        super().__init__()
        self.config = config
        self.event_shape = torch.Size(config.image_shape)
        _, h, w = config.image_shape
        self.time_embedding = SinusoidalEmbedding(config.time_features)
        self.rope = RotaryEmbedding2D(config.width // config.heads, config.rope_base)
        self.register_buffer("positions", patch_grid(h, w, config.patch_size), persistent=False)  # (L, 2)
        self.blocks = nn.ModuleList(AffineFlowBlock(config, flip=i % 2 == 1) for i in range(config.blocks))
        self.cond_spec = config.cond_spec
        self.cond_event_dims = config.cond_event_dims
        if self.cond_event_dims is not None:
            self.condition = TransporterCondition(config)

    def _prepare(
        self, name: str, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, torch.Size]:
        """Validate and flatten: ``x`` -> tokens ``(N, L, D)``, ``t`` -> embedding ``(N, F)``, the condition
        -> context ``(N, width)`` (``None`` when unconditional), and the batch shape."""
        check_images(name, x, self.event_shape)
        self.check_input(name, x, t)
        if self.config.validate_args:
            check_times("t", t)
        batch = x.shape[:-3]
        tokens = patchify(x.reshape(-1, *self.event_shape), self.config.patch_size)  # (N, L, D)
        ctx = None
        if self.is_conditional:
            n = tokens.shape[0]
            flat = None if cond is None else align_cond(cond, self.cond_event_dims, batch)  # type: ignore[arg-type]
            drop = None if drop_cond is None else drop_cond.reshape(-1)
            ctx = self.condition(flat, drop, n, x.device)
        return tokens, self.time_embedding(t.reshape(-1).to(x.device)), ctx, batch

    def forward(
        self, x: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(u, ladj)`` with ``u = f_T(x, t[, y])`` of ``x.shape`` and ``ladj`` of shape ``batch``."""
        z, emb, ctx, batch = self._prepare("x", x, t, cond, drop_cond)
        rope = self.rope(self.positions)
        ladj = z.new_zeros(z.shape[0], dtype=torch.promote_types(z.dtype, torch.float32))
        for block in self.blocks:
            z, block_ladj = block(z, emb, rope, ctx)
            ladj = ladj + block_ladj
        u = unpatchify(z, self.config.patch_size, self.event_shape).reshape(x.shape)
        return u, ladj.reshape(batch)

    def _invert(
        self, u: Tensor, t: Tensor, naive: bool, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        z, emb, ctx, _ = self._prepare("u", u, t, cond, drop_cond)
        rope = self.rope(self.positions)
        for block in reversed(self.blocks):
            z = block.inverse(z, emb, rope, ctx, naive=naive)
        return unpatchify(z, self.config.patch_size, self.event_shape).reshape(u.shape)

    def decode_static(self, z: Tensor, emb: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Tokens ``z`` ``(N, L, D)``, time features ``emb`` ``(N, time_features)`` and, for a conditional
        config, the condition context ``ctx`` ``(N, width)`` -> decoded tokens.

        Every block's :meth:`AffineFlowBlock.inverse_static`, in reverse order: no argument checks and no
        host synchronisation, fixed shapes for a given ``N`` (what a CUDA graph captures). Without grad.
        """
        rope = self.rope(self.positions)
        for block in reversed(self.blocks):
            z = block.inverse_static(z, emb, rope, ctx)
        return z

    def inverse(
        self,
        u: Tensor,
        t: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
        *,
        method: str | None = None,
    ) -> Tensor:
        """``x = f_T^{-1}(u, t[, y])`` of ``u``'s shape (float32, or float64 for float64 inputs): ``L - 1``
        one-token passes per block, blocks in reverse order.

        Arguments:
            method: ``"kv-cache"`` (autograd-safe; under :func:`torch.no_grad` the cache is preallocated),
                ``"static"`` (fixed-shape static cache, any device), ``"graph"`` (the static decode replayed
                from a CUDA graph captured per batch size and dtype; CUDA only) or ``"naive"``; ``None``
                uses :attr:`inverse_method`. ``"static"`` and ``"graph"`` run without grad: they raise if
                ``u`` or ``t`` requires grad while grad mode is on, and give no gradient to the parameters.
        """
        method = self.inverse_method if method is None else method
        if method not in INVERSE_METHODS:
            raise ValueError(f"method: expected one of {list(INVERSE_METHODS)} or None, got {method!r}")
        if method == "graph":
            return graphed_inverse(self)(u, t, cond, drop_cond)
        if method == "static":
            return self._invert_static(u, t, cond, drop_cond)
        return self._invert(u, t, method == "naive", cond, drop_cond)

    def _invert_static(self, u: Tensor, t: Tensor, cond: Condition | None, drop_cond: Tensor | None) -> Tensor:
        check_no_grad(u, t, "static")
        z, emb, ctx, _ = self._prepare("u", u, t, cond, drop_cond)
        with torch.no_grad():
            z = self.decode_static(z, emb, ctx)
        return unpatchify(z, self.config.patch_size, self.event_shape).reshape(u.shape)

    def inverse_naive(
        self, u: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        """The same as :meth:`inverse`, recomputing the full causal pass at every token (a reference)."""
        return self._invert(u, t, True, cond, drop_cond)
