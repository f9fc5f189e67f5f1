r"""The parts of :class:`~trajflow.transporters.TransformerTransporter`: its config, the optional condition
context and the causal autoregressive affine flow block (see :mod:`trajflow.transporters.transformer` for the
maths and the inverse methods).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..conditioning import Condition, ConditionFields
from ..nn.mlp import zero_linear
from ..nn.patches import PatchedImageConfig
from ..nn.scale import positive_scale
from ..nn.transformer import Rope, Transformer, check_transformer_config

__all__ = ["TransformerTransporterConfig", "TransporterCondition", "AffineFlowBlock"]


@dataclass
class TransformerTransporterConfig(ConditionFields, PatchedImageConfig):
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
        num_classes: Condition on class labels (``cond`` ``batch`` long) with this many classes.
        text_features: Condition on text features of this width (``cond`` is ``(features (*batch, L,
            text_features), mask (*batch, L))``); 0 means ``None``. At most one of the two; with neither the
            transporter is unconditional (no condition parameters at all).
        validate_args: Check that ``t`` is finite and in [0, 1] (a GPU synchronisation; switch it off in a
            tuned training loop). Shapes are always checked.
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
    num_classes: int | None = None
    text_features: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_transformer_config(self, ("width", "heads", "layers_per_block", "blocks"))
        self._check_condition()


class TransporterCondition(nn.Module):
    """The transporter's condition -> context ``(N, width)``, shared by the blocks (each maps it with its own
    zero-initialised ``cond_proj``).

    Class labels: a row of an embedding table. Text: the mean of the features over valid (unmasked) tokens
    (zero for none), then ``Linear -> SiLU``. Dropped examples get exactly zero, their features zeroed
    before pooling so that no value of theirs (not even NaN) reaches the result or the gradients.
    """

    def __init__(self, config: TransformerTransporterConfig) -> None:
        super().__init__()
        self.config = config
        if config.num_classes is not None:
            self.class_embedding = nn.Embedding(config.num_classes, config.width)
        else:  # only built for a conditional config
            self.text_proj = nn.Sequential(nn.Linear(config.text_features, config.width), nn.SiLU())

    def forward(self, cond: Condition | None, drop: Tensor | None, n: int, device: torch.device) -> Tensor:
        """Flat ``cond`` (batch ``(N,)``, or ``None`` = all dropped) and ``drop`` ``(N,)`` -> ``(N, width)``."""
        cfg = self.config
        weight = self.class_embedding.weight if cfg.num_classes is not None else self.text_proj[0].weight
        if cond is None:
            return torch.zeros(n, cfg.width, dtype=weight.dtype, device=device)
        dropped = torch.zeros(n, dtype=torch.bool, device=device) if drop is None else drop.to(device)
        if cfg.num_classes is not None:
            idx = cond.to(device=device, dtype=torch.long)  # type: ignore[union-attr]
            ctx = self.class_embedding(torch.where(dropped, torch.zeros_like(idx), idx))  # (N, width)
        else:
            features, mask = cond  # type: ignore[misc]
            keep = (mask.to(device) != 0) & ~dropped[:, None]  # (N, L)
            dtype = torch.promote_types(features.dtype, torch.float32)
            features = features.to(device=device, dtype=dtype)
            features = torch.where(keep[..., None], features, torch.zeros((), dtype=dtype, device=device))
            count = keep.sum(1, keepdim=True).clamp(min=1).to(dtype)  # (N, 1)
            pooled = features.sum(1) / count  # (N, D): the mean over valid tokens
            ctx = self.text_proj(pooled.to(weight.dtype))  # (N, width)
        return torch.where(dropped[:, None], torch.zeros((), dtype=ctx.dtype, device=device), ctx)


class AffineFlowBlock(nn.Module):
    """One causal affine autoregressive block (see :mod:`trajflow.transporters.transformer`) over patch tokens
    ``(N, L, D)``, given time features ``(N, time_features)``, an optional context ``ctx`` ``(N, width)`` and
    the RoPE tables of the grid in raster order; the block permutes tokens and tables itself."""

    def __init__(self, config: TransformerTransporterConfig, flip: bool) -> None:
        super().__init__()
        d, width = config.token_dim, config.width
        self.flip = flip
        self.scale_bound = config.scale_bound
        self.proj_in = nn.Linear(d, width)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_features, width), nn.SiLU(), nn.Linear(width, width))
        self.layers = Transformer(width, config.layers_per_block, config.heads, config.kv_heads)
        self.norm = nn.LayerNorm(width)
        # Zero head: mu = 0 and sigma = positive_scale(0) = 1 for every token, i.e. the identity.
        self.head = zero_linear(width, 2 * d)
        if config.cond_event_dims is not None:
            # Zero and bias-free: the condition adds nothing at init, and the null context (0) adds nothing.
            self.cond_proj = zero_linear(width, width, bias=False)

    def _order(self, z: Tensor) -> Tensor:
        """Apply the block's scan order along dim -2 (a flip is its own inverse)."""
        return z.flip(-2) if self.flip else z

    def _order_rope(self, rope: Rope) -> Rope:
        return self._order(rope[0]), self._order(rope[1])

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

    def time_embedding(self, emb: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Sinusoidal features ``(N, time_features)`` (+ condition context ``(N, width)``) -> ``(N, width)``."""
        dtype = self.proj_in.weight.dtype
        temb = self.time_mlp(emb.to(dtype))
        if ctx is not None:
            temb = temb + self.cond_proj(ctx.to(dtype))
        return temb

    def forward(self, x: Tensor, emb: Tensor, rope: Rope, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens ``x`` ``(N, L, D)`` in raster order -> ``(u (N, L, D), ladj (N,))``."""
        rope = self._order_rope(rope)
        z = self._order(x)
        mu, sigma = self.params(z, self.time_embedding(emb, ctx), rope)
        u = (z.to(mu.dtype) - mu) / sigma
        ladj = -torch.log(sigma).sum(dim=(1, 2))  # exact sum over tokens and channels, no mean
        return self._order(u), ladj

    def inverse(self, u: Tensor, emb: Tensor, rope: Rope, ctx: Tensor | None = None, *, naive: bool = False) -> Tensor:
        """Tokens ``u`` ``(N, L, D)`` -> ``x``, decoded one token at a time in scan order.

        With ``naive=False`` each step runs one token through the layers with a KV cache (static without
        grad, growing with grad); with ``naive=True`` each step recomputes the full causal pass.
        """
        rope = self._order_rope(rope)
        z = self._order(u)
        n, length, _ = z.shape
        temb = self.time_embedding(emb, ctx)
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

    def inverse_static(self, u: Tensor, emb: Tensor, rope: Rope, ctx: Tensor | None = None) -> Tensor:
        """:meth:`inverse` with a :class:`~trajflow.nn.transformer.StaticKVCache`: tokens ``u`` ``(N, L, D)``
        -> ``x`` (float32 at least), decoded in place into one buffer at ``position + 1`` (a ``(1,)`` device
        tensor), so the ``L - 1`` steps run identical kernels on identical shapes. Without grad only."""
        rope = self._order_rope(rope)
        dtype = torch.promote_types(u.dtype, torch.float32)
        out = self._order(u).to(dtype).clone()  # (N, L, D): token 0 is final, token i > 0 is replaced in turn
        n, length, _ = out.shape
        if length == 1:
            return self._order(out)
        temb = self.time_embedding(emb, ctx)[:, None]  # (N, 1, width)
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
