r"""A flow-matching velocity model for images on the predictor's transformer trunk
(:class:`~trajflow.predictors.transformer.TransformerBackbone`), so that an NTM predictor can be put on a
pretrained one (method.md section 3.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning import Condition
from ..nn.config import DataclassPretrained
from ..nn.patches import unpatchify
from ..predictors.transformer import TransformerBackbone, TransformerPredictorConfig
from .base import VelocityModel

__all__ = ["TransformerVelocity"]


class TransformerVelocity(DataclassPretrained, VelocityModel):
    r"""Flow-matching velocity model ``v(x_t, t, y)`` for images on :class:`TransformerBackbone`.

    A :class:`~trajflow.velocity.VelocityModel`, so it trains with the library's flow-matching loss
    and can seed a :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor`.

    ``forward(x_t, t, cond=None, drop_cond=None)`` returns ``(v, hidden)``: ``v`` of ``x_t``'s shape
    (float32; zero at init, the head is zero-initialised) and the hidden states ``(N, L, width)``, on which
    a fine-tuned NTM predictor can put its own zero-initialised head.

    Arguments:
        config: A :class:`TransformerPredictorConfig` (``scale_bound`` is not used).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
        >>> v, h = TransformerVelocity(cfg)(torch.randn(3, 1, 4, 4), torch.rand(3))
        >>> v.shape, h.shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3, 4, 16]))
    """

    config_class = TransformerPredictorConfig

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        TransformerBackbone.attach(self, config, num_times=1, outputs=config.token_dim)

    @property
    def validate_args(self) -> bool:
        """Whether inputs are checked by value (times in [0, 1]; the condition's values at the edges)."""
        return self.config.validate_args

    def hidden(self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """The backbone's final-normed hidden states of the image tokens, ``(N, L, width)``."""
        self.backbone.check("x_t", x_t, t=t)
        return self.backbone(x_t, [t], cond, drop_cond)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: velocity of ``x_t``'s shape and hidden states ``(N, L, width)``."""
        h = self.hidden(x_t, t, cond, drop_cond)
        v = unpatchify(self.head(h), self.config.patch_size, self.event_shape)
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), h
