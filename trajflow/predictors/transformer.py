r"""The image predictor: a full-attention transformer over the patch tokens of :math:`u_t`.

:class:`TransformerBackbone` is the shared trunk: patch tokens projected to the model width, plus
sinusoidal -> MLP embeddings of one or more times (``(t, s)`` for the predictor, ``t`` for a velocity model),
after a prefix of condition tokens, through full attention with 2-D RoPE over the patch grid. It returns the
final-normed hidden states of the image tokens, ``(N, L, width)``, on which models put their
zero-initialised heads: :class:`TransformerPredictor` (:math:`\mu_P = u_t + \delta`,
:math:`\sigma_P = ` ``positive_scale(raw)``, so :math:`\mu_P = u_t, \sigma_P = 1` at init) and
:class:`~trajflow.velocity.TransformerVelocity` (method.md section 3.4).

Conditions (``TransformerPredictorConfig``):

* class labels (``num_classes``): ``cond`` ``(N,)`` long, one prefix token from an embedding table whose
  extra last row is the learned null class;
* text (``text_features``): ``cond = (features (N, L_text, D_text) float, mask (N, L_text) bool)``, True
  marking real tokens, projected to the width after one learned null token. The null token is attended
  only by dropped examples, whose text tokens are all masked out, so a dropped example sees exactly what
  ``cond=None`` sees. Padded features are zeroed before the projection so that their values (even NaN)
  cannot leak;
* neither: unconditional, no prefix.

Prefix tokens sit at RoPE position ``(0, 0)`` (no rotation; see :mod:`trajflow.nn.transformer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_flat_times
from ..conditioning import Condition, ConditionFields
from ..nn.config import DataclassPretrained
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.mlp import zero_linear
from ..nn.patches import PatchedImageConfig, check_images, patch_grid, patchify, unpatchify
from ..nn.scale import positive_scale
from ..nn.transformer import RotaryEmbedding2D, Transformer, check_transformer_config
from .base import Predictor

__all__ = ["TransformerPredictorConfig", "TransformerBackbone", "TransformerPredictor"]


@dataclass
class TransformerPredictorConfig(ConditionFields, PatchedImageConfig):
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
        check_transformer_config(self, ("width", "depth", "heads"))
        self._check_condition()


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
        if self.config.num_classes is not None:
            return self._class_prefix(cond, drop, n, device), None
        if self.config.text_features is not None:
            return self._text_prefix(cond, drop, n, device)
        return None, None

    def _class_prefix(self, cond: Condition | None, drop: Tensor | None, n: int, device: torch.device) -> Tensor:
        null = torch.full((n,), self.config.num_classes, dtype=torch.long, device=device)
        idx = null if cond is None else cond.to(device=device, dtype=torch.long)  # type: ignore[union-attr]
        if drop is not None:
            idx = torch.where(drop, null, idx)
        return self.class_embedding(idx)[:, None]  # (N, 1, width)

    def _text_prefix(
        self, cond: Condition | None, drop: Tensor | None, n: int, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        null = self.null_text.expand(n, 1, -1)  # (N, 1, width)
        if cond is None:
            return null, None
        features, mask = cond  # type: ignore[misc]
        dropped = torch.zeros(n, dtype=torch.bool, device=device) if drop is None else drop
        keep = (mask.to(device) != 0) & ~dropped[:, None]  # (N, L_text)
        # Zero the padding before the projection so that no value of it (not even NaN) can reach the
        # attention sums or the projection's weight gradient.
        features = features.to(device)
        features = torch.where(keep[..., None], features, torch.zeros((), dtype=features.dtype, device=device))
        text = self.text_proj(features)  # (N, L_text, width)
        tokens = torch.cat([null.to(text.dtype), text], dim=1)  # (N, 1 + L_text, width)
        return tokens, torch.cat([dropped[:, None], keep], dim=1)  # (N, 1 + L_text)

    @staticmethod
    def attach(model: nn.Module, config: TransformerPredictorConfig, num_times: int, outputs: int) -> None:
        """Give ``model`` its ``config``, shapes and condition, a ``backbone`` and a zero-initialised ``head``
        from the width to ``outputs`` channels per token."""
        model.config = config
        model.event_shape = torch.Size(config.image_shape)
        model.cond_spec = config.cond_spec
        model.cond_event_dims = config.cond_event_dims
        model.backbone = TransformerBackbone(config, num_times)
        model.head = zero_linear(config.width, outputs)

    def check(self, name: str, x: Tensor, **times: Tensor) -> None:
        """Raise unless ``x`` is ``(N, C, H, W)`` and every time ``(N,)`` (finite, in [0, 1] with
        ``validate_args``): the models' checks before :meth:`forward`, which checks nothing."""
        check_images(name, x, self.config.image_shape, flat=True)
        for t_name, t in times.items():
            check_flat_times(t_name, t, x.shape[0], self.config.validate_args)

    def forward(
        self,
        x: Tensor,
        times: list[Tensor],
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """Hidden states ``(N, L, width)`` of the image tokens (after the final norm).

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


class TransformerPredictor(DataclassPretrained, Predictor):
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

    config_class = TransformerPredictorConfig

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        TransformerBackbone.attach(self, config, num_times=2, outputs=2 * config.token_dim)

    def hidden(
        self, u_t: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        """The backbone's final-normed hidden states of the image tokens, ``(N, L, width)``."""
        self.backbone.check("u_t", u_t, t=t, s=s)
        return self.backbone(u_t, [t, s], cond, drop_cond)

    def forward(
        self, u_t: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of :math:`p(u_s | u_t, y)`, each of ``u_t``'s shape."""
        h = self.hidden(u_t, t, s, cond, drop_cond)  # (N, L, width)
        delta, raw = self.head(h).chunk(2, dim=-1)  # (N, L, D) each
        dtype = torch.promote_types(u_t.dtype, torch.float32)
        p, shape = self.config.patch_size, self.event_shape
        mu = u_t.to(dtype) + unpatchify(delta, p, shape).to(dtype)
        sigma = unpatchify(positive_scale(raw, self.config.scale_bound), p, shape).to(dtype)
        return mu, sigma
