"""A flow-matching diffusers ``UNet2DModel`` as a velocity model (class labels as the condition), and MeanFlow's
average velocity on one."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ...checks import check_tensor
from ...conditioning import Condition, CondPart, CondSpec
from ...nn.patches import patchify
from .base import DiffusersVelocity, _image_size

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["UNet2DVelocity", "UNet2DMeanFlow"]


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


class UNet2DMeanFlow(nn.Module):
    r"""MeanFlow's average velocity :math:`u(z, r, t)` on a flow-matching :class:`UNet2DVelocity`.

    The interval :math:`t - r` enters as a second time: diffusers' sinusoidal projection of
    ``num_train_timesteps * (t - r)`` (the UNet's own ``time_proj``) through a new MLP of the UNet's time
    embedding's shape, whose output is added to the UNet's time embedding (where diffusers adds a class
    embedding, so class labels keep theirs). Its last layer starts at zero, so a model built by
    :meth:`from_velocity` equals its teacher for every :math:`r`, as
    :class:`~trajflow.baselines.MeanFlowVelocity` does on the library's transformer. ``forward(z, r, t,
    cond=None, drop_cond=None)`` returns ``u`` of ``z``'s shape; :class:`~trajflow.baselines.MeanFlowLoss` and
    :func:`~trajflow.baselines.meanflow_sample` take it as they take ``MeanFlowVelocity``.

    Arguments:
        velocity: The flow-matching UNet adapter the average velocity starts from (trained with it: pass a copy
            to keep the teacher; :meth:`from_velocity` copies).

    Example:
        >>> from diffusers import UNet2DModel  # doctest: +SKIP
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    layers_per_block=1, norm_num_groups=4,
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))  # doctest: +SKIP
        >>> teacher = UNet2DVelocity(unet)  # doctest: +SKIP
        >>> model = UNet2DMeanFlow.from_velocity(teacher)  # doctest: +SKIP
        >>> z, t = torch.randn(3, 1, 8, 8), torch.rand(3)  # doctest: +SKIP
        >>> torch.allclose(model(z, 0.5 * t, t), teacher(z, t)[0], atol=1e-5)  # doctest: +SKIP
        True
    """

    def __init__(self, velocity: UNet2DVelocity) -> None:
        super().__init__()
        if not isinstance(velocity, UNet2DVelocity):
            raise ValueError(f"velocity: expected a UNet2DVelocity, got {type(velocity).__name__}")
        self.base = velocity
        time_mlp = velocity.unet.time_embedding  # diffusers' TimestepEmbedding: linear_1, act, linear_2
        self.interval_embedding = type(time_mlp)(
            time_mlp.linear_1.in_features, time_mlp.linear_2.out_features, act_fn=velocity.unet.config.act_fn
        )
        nn.init.zeros_(self.interval_embedding.linear_2.weight)  # the interval adds exactly 0 at init: u = v
        nn.init.zeros_(self.interval_embedding.linear_2.bias)
        param = next(velocity.parameters())
        self.interval_embedding.to(device=param.device, dtype=param.dtype)

    @classmethod
    def from_velocity(cls, velocity: UNet2DVelocity) -> UNet2DMeanFlow:
        """A copy of a pretrained flow-matching UNet adapter (same device and dtype) with :math:`u = v`."""
        return cls(copy.deepcopy(velocity))  # the constructor checks the copy's type

    # What MeanFlowLoss and meanflow_sample read of a model: its event shape and condition, as the base's.
    @property
    def event_shape(self) -> torch.Size:
        return self.base.event_shape

    @property
    def cond_spec(self) -> CondSpec | None:
        return self.base.cond_spec

    @property
    def cond_event_dims(self) -> int | None:
        return self.base.cond_event_dims

    @property
    def num_classes(self) -> int | None:
        return self.base.num_classes

    @property
    def validate_args(self) -> bool:
        return self.base.validate_args

    def forward(
        self, z: Tensor, r: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        """The average velocity ``u`` from ``t`` down to ``r``, of ``z``'s shape ``(N, C, H, W)``."""
        check_tensor("r", r)
        if r.shape != t.shape:
            raise ValueError(f"r: expected the shape of t, {tuple(t.shape)}, got {tuple(r.shape)}")
        if self.validate_args and bool((r > t).any()):
            raise ValueError(f"r: expected r <= t, got r - t up to {float((r - t).max()):.6g}")
        unet = self.base.unet
        interval = self.interval_embedding(unet.time_proj(self.base.timestep(t - r)).to(unet.dtype))  # (N, E)
        # Added to the time embedding's output for this call only; the hook lives inside the call, so the
        # forward-mode JVP of MeanFlowLoss sees the interval's path too.
        handles = [unet.time_embedding.register_forward_hook(lambda _module, _args, emb: emb + interval)]
        # torch's forward-mode derivative of group_norm views its tangent, which fails on the non-contiguous
        # tangents diffusers' attention blocks hand on (a RuntimeError in MeanFlowLoss's JVP): a contiguous
        # copy before each GroupNorm, a no-op for contiguous inputs.
        handles += [
            m.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
            for m in unet.modules()
            if isinstance(m, nn.GroupNorm)
        ]
        try:
            u, _ = self.base(z, t, cond, drop_cond)
        finally:
            for handle in handles:
                handle.remove()
        return u
