r"""The image predictor: a full-attention transformer over the patch tokens of :math:`u_t`.

:class:`TransformerBackbone` is the shared trunk. It patchifies an image-shaped input into ``L`` tokens,
projects them to the model width, adds sinusoidal -> MLP embeddings of one or more times (``t`` and ``s``
for the predictor, ``t`` for a velocity model) to every image token, prepends condition tokens and runs
full (non-causal) attention with 2-D RoPE over the patch grid. It returns the final-normed hidden states of
the image tokens, ``(N, L, width)``, on which models put their zero-initialised heads:

* :class:`TransformerPredictor`: NTM's deep predictor, a head to ``(delta, raw_sigma)`` per token with
  :math:`\mu_P = u_t + \delta` and :math:`\sigma_P = ` ``positive_scale(raw_sigma)``, so at init
  :math:`\mu_P = u_t, \sigma_P = 1`.
* :class:`~trajflow.velocity.TransformerVelocity`: the flow-matching baseline on the same trunk, a head to the velocity
  ``v`` (zero at init); it also returns the hidden states, so an NTM predictor can be put on a pretrained
  velocity model (method.md section 3.4).

Conditions (``TransformerPredictorConfig``):

* class labels (``num_classes``): ``cond`` ``(N,)`` long, one prefix token from an embedding table whose
  extra last row is the learned null class;
* text (``text_features``): ``cond = (features (N, L_text, D_text) float, mask (N, L_text) bool)``, True
  marking real tokens. The features are projected to the width and prepended after one learned null
  token. The null token is attended only by dropped examples, whose text tokens are all masked out, so a
  dropped example sees exactly what ``cond=None`` sees (the null token alone). Padded features are
  zeroed before the projection so that their values (even NaN) cannot leak;
* neither: unconditional, no prefix.

Prefix tokens sit at RoPE position ``(0, 0)`` (no rotation; see :mod:`trajflow.nn.transformer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained, dataclass_from_dict
from ..checks import check_flat_times
from ..conditioning import Condition, CondSpec
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.patches import PatchedImageConfig, check_images, patch_grid, patchify, unpatchify
from ..nn.scale import positive_scale
from ..nn.transformer import RotaryEmbedding2D, Transformer, check_attention_dims
from .base import Predictor

__all__ = ["TransformerPredictorConfig", "TransformerBackbone", "TransformerPredictor"]


@dataclass
class TransformerPredictorConfig(PatchedImageConfig):
    r"""Hyper-parameters of :class:`TransformerPredictor` and :class:`~trajflow.velocity.TransformerVelocity`.

    Attributes:
        image_shape: ``(C, H, W)`` of one data point.
        patch_size: Side ``p`` of the square patches; ``H`` and ``W`` must be multiples of it.
        width: Transformer width.
        depth: Transformer layers.
        heads: Attention heads; ``width / heads`` must be a multiple of 4 (2-D RoPE).
        kv_heads: Key/value heads for grouped-query attention (``None``: same as ``heads``).
        time_features: Size of each sinusoidal time embedding (before its MLP to ``width``).
        num_classes: Class-conditional with this many classes (``cond`` is ``(N,)`` long).
        text_features: Text-conditional with encoder features of this width (``cond`` is
            ``(features, mask)``). At most one of ``num_classes`` and ``text_features`` may be set.
        scale_bound: Soft-clip bound of the raw log-scale of :math:`\sigma_P` (predictor only); the
            default 8 allows :math:`\sigma_P \in (0.00058, 8.5)`.
        rope_base: Base of the RoPE frequencies.
        validate_args: Check that times are finite and in [0, 1] and class indices in range (these read
            values, which synchronises a GPU).
    """

    width: int = 256
    depth: int = 8
    heads: int = 4
    kv_heads: int | None = None
    time_features: int = 128
    num_classes: int | None = None
    text_features: int | None = None
    scale_bound: float = 8.0
    rope_base: float = 100.0
    validate_args: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        check_attention_dims(self.width, self.heads, self.kv_heads, self.time_features)
        self._check_condition()
        if not self.scale_bound > 0:
            raise ValueError(f"scale_bound: expected a positive bound, got {self.scale_bound}")

    def _check_condition(self) -> None:
        """At most one kind of condition: ``num_classes`` or ``text_features``, each positive."""
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer or None, got {self.num_classes}")
        if self.text_features is not None and self.text_features < 1:
            raise ValueError(f"text_features: expected a positive integer or None, got {self.text_features}")
        if self.num_classes is not None and self.text_features is not None:
            raise ValueError(
                "num_classes, text_features: expected at most one kind of condition, got both "
                f"num_classes={self.num_classes} and text_features={self.text_features}"
            )

    @property
    def cond_spec(self) -> CondSpec | None:
        """The condition: class indices, text ``(features, mask)`` or ``None`` (unconditional)."""
        return CondSpec.of(num_classes=self.num_classes, text_features=self.text_features)

    @property
    def cond_event_dims(self) -> int | tuple[int, int] | None:
        """Trailing dims of one condition: 0 (class), ``(2, 1)`` (text features, mask) or ``None``."""
        spec = self.cond_spec
        return None if spec is None else spec.event_dims  # type: ignore[return-value]


class TransformerBackbone(nn.Module):
    """Patch tokens + time embeddings + condition prefix -> full-attention transformer -> hidden states.

    Arguments:
        config: A :class:`TransformerPredictorConfig`.
        num_times: How many times are embedded and added (2 for ``(t, s)``, 1 for ``t``).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), 2, width=16, depth=1, heads=2, num_classes=3)
        >>> net = TransformerBackbone(cfg, num_times=1)
        >>> net(torch.randn(5, 1, 4, 4), [torch.rand(5)], torch.tensor([0, 1, 2, 0, 1])).shape
        torch.Size([5, 4, 16])
    """

    def __init__(self, config: TransformerPredictorConfig, num_times: int) -> None:
        super().__init__()
        self.config = config
        width = config.width
        _, h, w = config.image_shape
        self.proj_in = nn.Linear(config.token_dim, width)
        self.time_embedding = SinusoidalEmbedding(config.time_features)
        self.time_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(config.time_features, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(num_times)
        )
        if config.num_classes is not None:
            # Row num_classes is the learned null class.
            self.class_embedding = nn.Embedding(config.num_classes + 1, width)
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        if config.text_features is not None:
            self.text_proj = nn.Linear(config.text_features, width)
            self.null_text = nn.Parameter(0.02 * torch.randn(1, 1, width))  # (1, 1, width)
        self.layers = Transformer(width, config.depth, config.heads, config.kv_heads)
        self.norm = nn.LayerNorm(width)
        self.rope = RotaryEmbedding2D(width // config.heads, config.rope_base)
        self.register_buffer("positions", patch_grid(h, w, config.patch_size), persistent=False)  # (L, 2)

    def _prefix(
        self, cond: Condition | None, drop: Tensor | None, n: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """Condition tokens ``(N, P, width)`` and their key mask ``(N, P)`` (``None`` = all attended)."""
        cfg = self.config
        if cfg.num_classes is not None:
            null = torch.full((n,), cfg.num_classes, dtype=torch.long, device=device)
            idx = null if cond is None else cond.to(device=device, dtype=torch.long)  # type: ignore[union-attr]
            if drop is not None:
                idx = torch.where(drop, null, idx)
            return self.class_embedding(idx)[:, None], None  # (N, 1, width)
        if cfg.text_features is not None:
            null = self.null_text.expand(n, 1, -1)  # (N, 1, width)
            if cond is None:
                return null, None
            features, mask = cond  # type: ignore[misc]
            keep = mask.to(device) != 0  # (N, L_text)
            dropped = torch.zeros(n, dtype=torch.bool, device=device) if drop is None else drop
            keep = keep & ~dropped[:, None]
            # Zero the padding before the projection so that no value of it (not even NaN) can reach the
            # attention sums or the projection's weight gradient.
            features = features.to(device)
            features = torch.where(keep[..., None], features, torch.zeros((), dtype=features.dtype, device=device))
            text = self.text_proj(features)  # (N, L_text, width)
            tokens = torch.cat([null.to(text.dtype), text], dim=1)  # (N, 1 + L_text, width)
            return tokens, torch.cat([dropped[:, None], keep], dim=1)  # (N, 1 + L_text)
        return None, None

    def forward(
        self,
        x: Tensor,
        times: list[Tensor],
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """Hidden states ``(N, L, width)`` of the image tokens (after the final norm).

        No argument checks here: the models check before calling.

        Arguments:
            x: Images ``(N, C, H, W)``.
            times: ``num_times`` tensors ``(N,)``.
            cond: ``None`` or a condition of batch shape ``(N,)``.
            drop_cond: ``None`` or ``(N,)`` bool, True where the null condition replaces ``cond``.
        """
        n = x.shape[0]
        tokens = patchify(x, self.config.patch_size)  # (N, L, D)
        h = self.proj_in(tokens)  # (N, L, width)
        for t, mlp in zip(times, self.time_mlps):
            h = h + mlp(self.time_embedding(t.to(x.device)).to(self.proj_in.weight.dtype))[:, None]
        cos, sin = self.rope(self.positions)  # (L, hd / 2)
        prefix, prefix_mask = self._prefix(cond, drop_cond, n, x.device)
        key_mask = None
        if prefix is not None:
            p = prefix.shape[1]
            h = torch.cat([prefix.to(h.dtype), h], dim=1)  # (N, P + L, width)
            # Prefix tokens at position (0, 0): cos = 1, sin = 0, i.e. no rotation.
            cos = torch.cat([cos.new_ones(p, cos.shape[1]), cos])
            sin = torch.cat([sin.new_zeros(p, sin.shape[1]), sin])
            if prefix_mask is not None:
                image = torch.ones(n, tokens.shape[1], dtype=torch.bool, device=x.device)
                key_mask = torch.cat([prefix_mask, image], dim=1)  # (N, P + L)
        h = self.layers(h, (cos, sin), causal=False, key_mask=key_mask)
        return self.norm(h[:, h.shape[1] - tokens.shape[1] :])  # image tokens only


class TransformerPredictor(Pretrained, Predictor):
    r"""NTM's deep predictor :math:`(\mu_P, \sigma_P) = P(u_t, t, s, y)` for images.

    Calls are flat: ``u_t`` ``(N, C, H, W)``, ``t`` and ``s`` ``(N,)``. Returns ``mu`` and ``sigma`` of
    ``u_t``'s shape, in float32 (float64 for a float64 model), with ``mu = u_t`` and ``sigma = 1`` at init.

    Arguments:
        config: A :class:`TransformerPredictorConfig`.

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), 2, width=16, depth=1, heads=2, num_classes=3)
        >>> pred = TransformerPredictor(cfg)
        >>> u, t = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 0.9])
        >>> mu, sigma = pred(u, t, 0.5 * t, torch.tensor([0, 2]))
        >>> torch.equal(mu, u), bool((sigma == 1).all())
        (True, True)
    """

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.event_shape = torch.Size(config.image_shape)
        self.cond_spec = config.cond_spec
        self.cond_event_dims = config.cond_event_dims
        self.backbone = TransformerBackbone(config, num_times=2)
        self.head = nn.Linear(config.width, 2 * config.token_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config_dict(self) -> dict[str, Any]:
        """The fields of :attr:`config` (see :meth:`~trajflow.checkpoint.Pretrained.save_pretrained`)."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerPredictor:
        return cls(dataclass_from_dict(TransformerPredictorConfig, config, "config"))

    def _check(self, u_t: Tensor, t: Tensor, s: Tensor) -> None:
        check_images("u_t", u_t, self.event_shape, flat=True)
        n = u_t.shape[0]
        check_flat_times("t", t, n, self.config.validate_args)
        check_flat_times("s", s, n, self.config.validate_args)

    def hidden(
        self,
        u_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """The backbone's final-normed hidden states of the image tokens, ``(N, L, width)``."""
        self._check(u_t, t, s)
        return self.backbone(u_t, [t, s], cond, drop_cond)

    def forward(
        self,
        u_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of :math:`p(u_s | u_t, y)`, each of ``u_t``'s shape."""
        h = self.hidden(u_t, t, s, cond, drop_cond)  # (N, L, width)
        delta, raw = self.head(h).chunk(2, dim=-1)  # (N, L, D) each
        dtype = torch.promote_types(u_t.dtype, torch.float32)
        p, shape = self.config.patch_size, self.event_shape
        mu = u_t.to(dtype) + unpatchify(delta, p, shape).to(dtype)
        sigma = unpatchify(positive_scale(raw, self.config.scale_bound), p, shape).to(dtype)
        return mu, sigma
