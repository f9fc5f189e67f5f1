r"""A flow-matching velocity model for images on the predictor's transformer trunk
(:class:`~trajflow.predictors.transformer.TransformerBackbone`), so that an NTM predictor can be put on a
pretrained one (method.md section 3.4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained, dataclass_from_dict
from ..checks import check_flat_times
from ..conditioning import Condition
from ..nn.patches import check_images, unpatchify
from ..predictors.transformer import TransformerBackbone, TransformerPredictorConfig
from .base import VelocityModel

__all__ = ["TransformerVelocity"]


class TransformerVelocity(Pretrained, VelocityModel):
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

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.event_shape = torch.Size(config.image_shape)
        self.cond_spec = config.cond_spec
        self.cond_event_dims = config.cond_event_dims
        self.backbone = TransformerBackbone(config, num_times=1)
        self.head = nn.Linear(config.width, config.token_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def validate_args(self) -> bool:
        """Whether inputs are checked by value (times in [0, 1]; the condition's values at the edges)."""
        return self.config.validate_args

    def config_dict(self) -> dict[str, Any]:
        """The fields of :attr:`config` (see :meth:`~trajflow.checkpoint.Pretrained.save_pretrained`)."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerVelocity:
        return cls(dataclass_from_dict(TransformerPredictorConfig, config, "config"))

    def hidden(self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """The backbone's final-normed hidden states of the image tokens, ``(N, L, width)``."""
        check_images("x_t", x_t, self.event_shape, flat=True)
        n = x_t.shape[0]
        check_flat_times("t", t, n, self.config.validate_args)
        return self.backbone(x_t, [t], cond, drop_cond)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: velocity of ``x_t``'s shape and hidden states ``(N, L, width)``."""
        h = self.hidden(x_t, t, cond, drop_cond)
        v = unpatchify(self.head(h), self.config.patch_size, self.event_shape)
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), h
