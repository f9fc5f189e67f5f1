"""A flow-matching diffusers ``UNet2DModel`` as a velocity model (class labels as the condition)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...conditioning import Condition, CondPart, CondSpec
from ...nn.patches import patchify
from .base import DiffusersVelocity, _image_size

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["UNet2DVelocity"]


# What a UNet needs to be a velocity model: (what is wrong, its message with the config as {c}).
_UNET_CONFIG_CHECKS = (
    (
        lambda c: c.in_channels != c.out_channels,
        "expected as many output as input channels (a velocity has the image's shape), got "
        "in_channels={c.in_channels}, out_channels={c.out_channels}",
    ),
    (
        lambda c: c.time_embedding_type != "positional",
        "expected time_embedding_type='positional' (a flow-matching UNet called at num_train_timesteps * t), "
        "got {c.time_embedding_type!r}",
    ),
    (
        lambda c: c.class_embed_type is not None,
        "expected class_embed_type=None (labels through num_class_embeds), got {c.class_embed_type!r}",
    ),
    (
        lambda c: c.num_class_embeds is not None and c.num_class_embeds < 2,
        "a class-conditional UNet needs num_class_embeds >= 2 (the last is the null class), got {c.num_class_embeds}",
    ),
)


def _sample_size(config: Any, sample_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """``(H, W)``: ``sample_size`` or the config's, divisible by the UNet's downsampling factor."""
    size = config.sample_size if sample_size is None else sample_size
    height, width = _image_size("sample_size", size, "the UNet")
    factor = 2 ** (len(config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"sample_size: expected a positive (H, W) divisible by the UNet's downsampling factor {factor}, "
            f"got {size!r}"
        )
    return height, width


class UNet2DVelocity(DiffusersVelocity):
    r"""A flow-matching diffusers ``UNet2DModel`` as a velocity model, hidden states included.

    ``forward(x_t, t, cond=None, drop_cond=None)`` returns ``(v, hidden)``: ``v = unet(x_t, timestep=
    num_train_timesteps * t, class_labels=...).sample`` (float32, or ``x_t``'s dtype if wider) and ``hidden`` the
    final-normed feature map that ``conv_out`` reads, ``(N, C', H, W)`` with ``C' = block_out_channels[0]``, as
    tokens ``(N, H W, C')`` in raster order in the UNet's dtype. ``hidden_features = C'``, ``hidden_layout =
    "tokens"`` and ``patch_size = 1`` are what :class:`~trajflow.predictors.FlowMatchingPredictor` reads, so
    :func:`trajflow.finetune.init_from_flow_matching` takes the adapter as it is.

    A UNet with ``num_class_embeds = K`` is class-conditional: ``cond`` is a LongTensor of labels ``(N,)`` in
    ``0..K-2``, and **the last class index** ``K - 1`` **is the null class** of classifier-free guidance (rows
    where ``drop_cond`` is True, and every row when ``cond`` is None); so ``cond_event_dims = 0`` and
    ``num_classes = K - 1``, and the UNet must be trained with guidance dropout to label ``K - 1``. An
    unconditional UNet refuses a ``cond``; ``class_embed_type`` s and non-positional time embeddings are refused.

    Arguments:
        unet: A diffusers ``UNet2DModel`` trained as a flow-matching velocity model (see the module
            docstring), with as many output as input channels.
        sample_size: ``H`` or ``(H, W)`` of the images, by default the UNet's ``sample_size``; any size the
            UNet's downsampling divides works (the UNet is convolutional).
        num_train_timesteps: diffusers' timestep of :math:`t = 1`.
        validate_args: Check ``t`` in [0, 1] and the class labels' range (a GPU synchronisation).

    Example:
        >>> from diffusers import UNet2DModel  # doctest: +SKIP
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    layers_per_block=1, norm_num_groups=4, num_class_embeds=11,
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))  # doctest: +SKIP
        >>> velocity = UNet2DVelocity(unet)  # doctest: +SKIP
        >>> velocity.num_classes, velocity.null_class, velocity.hidden_features  # doctest: +SKIP
        (10, 10, 8)
        >>> v, hidden = velocity(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 9]))  # doctest: +SKIP
    """

    diffusers_class: ClassVar[str] = "UNet2DModel"
    model_argument: ClassVar[str] = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(unet, num_train_timesteps=num_train_timesteps, validate_args=validate_args)
        config = unet.config
        for wrong, message in _UNET_CONFIG_CHECKS:
            if wrong(config):
                raise ValueError("unet: " + message.format(c=config))
        height, width = _sample_size(config, sample_size)
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.hidden_features = int(config.block_out_channels[0])
        self.hidden_layout = "tokens"
        self.patch_size = 1
        self._set_classes(config.num_class_embeds)

    def _set_classes(self, embeds: int | None) -> None:
        """The classes of a class-conditional UNet (its last class embedding is the null class), or none."""
        self.num_classes: int | None = None if embeds is None else embeds - 1
        self.null_class: int | None = self.num_classes  # the last class index
        self.cond_event_dims = None if embeds is None else 0
        self.cond_spec = None
        if embeds is not None:  # checked where the condition enters (trajflow.conditioning.check_cond)
            self.cond_spec = CondSpec(
                (CondPart("class labels", (), "integer", self.num_classes),),
                hint=f" (label {self.null_class} is the reserved null class; use drop_cond)",
            )

    @property
    def unet(self) -> UNet2DModel:
        """The wrapped ``UNet2DModel``."""
        return self.model  # type: ignore[return-value]

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), **super().settings()}

    def _labels(self, cond: Condition | None, drop_cond: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """The UNet's ``class_labels`` ``(n,)``: ``cond`` with the null class where dropped (None: unconditional)."""
        if self.null_class is None:
            return None
        null = torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if cond is None:
            return null
        labels = cond.to(device=device, dtype=torch.long)
        return labels if drop_cond is None else torch.where(drop_cond, null, labels)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape ``(N, C, H, W)`` and ``hidden`` ``(N, H W, C')``."""
        self._check_inputs(x_t, t)
        labels = self._labels(cond, drop_cond, x_t.shape[0], x_t.device)
        v, hidden = self._hooked(
            self.model.conv_out, lambda: self.model(x_t.to(self.model.dtype), self.timestep(t), class_labels=labels)
        )
        # hidden: (N, C', H, W) -> (N, H W, C'), raster order
        return v.sample.to(torch.promote_types(x_t.dtype, torch.float32)), patchify(hidden, 1)
