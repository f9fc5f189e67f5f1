"""Text-to-image transformers as velocity models: what SD3 and FLUX share, and SD3's adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ...checks import check_tensor, check_times
from ...conditioning import Condition, CondPart, CondSpec
from ...nn.patches import check_images
from .base import DiffusersVelocity, _diffusers_class

__all__ = ["SD3Velocity"]


def _image_size(name: str, size: object, what: str) -> tuple[int, int]:
    """``(H, W)`` of an int or a pair; a ValueError naming ``name`` otherwise."""
    if size is None:
        raise ValueError(f"{name}: {what} has no sample size in its config, expected the latent (H, W), got None")
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ValueError(f"{name}: expected a positive int or (H, W), got {size!r}")
    return int(size[0]), int(size[1])


T = TypeVar("T", bound="_TextTransformerVelocity")


class _TextTransformerVelocity(DiffusersVelocity):
    r"""The part the SD3 / FLUX adapters share: the text condition, its null, the hidden-state hook, ``forward``.

    A subclass sets ``pooled`` (whether the network takes pooled embeddings), builds ``event_shape``,
    ``patch_size`` and ``sample_size``, and implements :meth:`_velocity` (the network call in trajflow's
    layout: latents ``(N, C, H, W)`` in, :math:`v` of the same shape out).
    """

    pooled: ClassVar[bool] = True
    model_argument: ClassVar[str] = "transformer"

    def __init__(
        self,
        transformer: nn.Module,
        *,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(transformer, num_train_timesteps=num_train_timesteps, validate_args=validate_args)
        config = transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ValueError(
                f"transformer: expected as many output as input channels (a velocity has the latent's shape), got "
                f"in_channels={config.in_channels}, out_channels={config.out_channels}"
            )
        self.text_features = int(config.joint_attention_dim)
        self.pooled_features: int | None = int(config.pooled_projection_dim) if self.pooled else None
        self.cond_event_dims = (2, 1) if self.pooled else 2
        self.hidden_features = int(config.num_attention_heads * config.attention_head_dim)
        self.hidden_layout = "tokens"
        prompt, pooled = self._parse_null(null_cond)
        self.register_buffer("null_prompt_embeds", prompt)
        self.register_buffer("null_pooled_embeds", pooled)

    # -- the text condition ------------------------------------------------------------------------------------

    def _parse_null(self, null_cond: Condition | None) -> tuple[Tensor | None, Tensor | None]:
        """``null_cond`` without batch dims (or with a batch of 1), checked: ``(prompt (L, D), pooled (P,))``."""
        if null_cond is None:
            return None, None
        parts = null_cond if isinstance(null_cond, tuple) else (null_cond,)
        want = 2 if self.pooled else 1
        form = "(prompt_embeds (L, D), pooled_embeds (P,))" if self.pooled else "a tensor prompt_embeds (L, D)"
        if len(parts) != want or not all(isinstance(p, Tensor) for p in parts):
            raise ValueError(
                f"null_cond: expected {form} (one condition, no batch dim), got {type(null_cond).__name__}"
            )
        prompt = self._null_prompt(parts[0])
        if not self.pooled:
            return prompt, None
        return prompt, self._null_pooled(parts[1])

    def _null_prompt(self, given: Tensor) -> Tensor:
        """The null prompt embeddings ``(L, D)`` (a batch of 1 dropped), checked and copied."""
        prompt = given.detach()
        if prompt.dim() == 3 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 2 or prompt.shape[-1] != self.text_features or not prompt.is_floating_point():
            raise ValueError(
                f"null_cond: expected prompt embeddings (L, {self.text_features}) (the network's joint_attention_dim), "
                f"got {prompt.dtype} of shape {tuple(given.shape)}"
            )
        return prompt.clone()

    def _null_pooled(self, given: Tensor) -> Tensor:
        """The null pooled embeddings ``(P,)`` (a batch of 1 dropped), checked and copied."""
        pooled = given.detach()
        if pooled.dim() == 2 and pooled.shape[0] == 1:
            pooled = pooled[0]
        if pooled.shape != (self.pooled_features,) or not pooled.is_floating_point():
            raise ValueError(
                f"null_cond: expected pooled embeddings ({self.pooled_features},) (the network's "
                f"pooled_projection_dim), got {pooled.dtype} of shape {tuple(given.shape)}"
            )
        return pooled.clone()

    @property
    def null_cond(self) -> Condition | None:
        """The null condition of guidance dropout given at construction (no batch dim), or None (zeros)."""
        if self.null_prompt_embeds is None:
            return None
        return (self.null_prompt_embeds, self.null_pooled_embeds) if self.pooled else self.null_prompt_embeds

    @property
    def cond_spec(self) -> CondSpec:
        """The text condition (checked where it enters, by :func:`trajflow.conditioning.check_cond`):
        ``prompt_embeds (N, L, D)`` (and ``pooled_embeds (N, P)``); ``None`` only with a ``null_cond``."""
        parts = (CondPart("prompt embeddings", (None, self.text_features), "float"),)
        if self.pooled:
            parts += (CondPart("pooled embeddings", (self.pooled_features,), "float"),)
        hint = " (for unconditional calls pass null_cond=... at construction, e.g. the empty prompt's embeddings)"
        return CondSpec(parts, null=self.null_prompt_embeds is not None, hint=hint)

    def _text(self, cond: Condition | None, drop_cond: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
        """The network's ``(prompt_embeds (n, L, D), pooled (n, P) or None)``, null rows where dropped."""
        if cond is None:  # the null condition everywhere (the edge made sure there is one)
            prompt = self.null_prompt_embeds.expand(n, -1, -1)
            pooled = None if self.null_pooled_embeds is None else self.null_pooled_embeds.expand(n, -1)
            return prompt, pooled
        prompt, pooled = cond if isinstance(cond, tuple) else (cond, None)
        if drop_cond is None:
            return prompt, pooled
        drop = drop_cond.to(prompt.device)
        if self.null_prompt_embeds is None:  # zeros
            null_prompt = prompt.new_zeros(())
            null_pooled = None if pooled is None else pooled.new_zeros(())
        else:
            null_prompt = self.null_prompt_embeds.to(prompt)
            if null_prompt.shape[0] != prompt.shape[1]:
                raise ValueError(
                    f"null_cond: its {null_prompt.shape[0]} text tokens cannot replace dropped rows of a condition "
                    f"with {prompt.shape[1]} tokens; encode the null prompt padded to the same length"
                )
            null_pooled = None if pooled is None else self.null_pooled_embeds.to(pooled)
        prompt = torch.where(drop[:, None, None], null_prompt, prompt)
        if pooled is not None:
            pooled = torch.where(drop[:, None], null_pooled, pooled)
        return prompt, pooled

    # -- saving ------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        length = None if self.null_prompt_embeds is None else int(self.null_prompt_embeds.shape[0])
        return {"null_text_length": length, **super().settings()}

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """An untrained copy; a null condition of ``null_text_length`` tokens is zeros until the weights load."""
        settings = {k: v for k, v in config.items() if k not in ("model", "null_text_length")}
        length = config.get("null_text_length")
        model = _diffusers_class(cls.diffusers_class).from_config(dict(config["model"]))
        null: Condition | None = None
        if length is not None:
            prompt = torch.zeros(length, model.config.joint_attention_dim)
            null = (prompt, torch.zeros(model.config.pooled_projection_dim)) if cls.pooled else prompt
        return cls(model, null_cond=null, **settings)

    # -- the call ----------------------------------------------------------------------------------------------

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape ``(N, C, H, W)`` and ``hidden`` ``(N, L_img, width)``."""
        check_images("x_t", x_t, self.event_shape, flat=True)
        n = x_t.shape[0]
        check_tensor("t", t)
        if t.shape != (n,) or not t.is_floating_point():
            raise ValueError(
                f"t: expected a float tensor of shape ({n},) (one time per latent), got {t.dtype} "
                f"of shape {tuple(t.shape)}"
            )
        if self.validate_args:
            check_times("t", t)
        prompt, pooled = self._text(cond, drop_cond, n)
        dtype = self.model.dtype
        prompt = prompt.to(device=x_t.device, dtype=dtype)
        pooled = None if pooled is None else pooled.to(device=x_t.device, dtype=dtype)
        captured: list[Tensor] = []
        # The image tokens the output projection reads (after the final AdaLN norm_out), (N, L_img, width).
        handle = self.model.proj_out.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            v = self._velocity(x_t.to(dtype), t, prompt, pooled)
        finally:
            handle.remove()
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), captured[-1]


class SD3Velocity(_TextTransformerVelocity):
    r"""A diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) as a text-conditional velocity model.

    The conversion (diffusers 0.42): ``StableDiffusion3Pipeline.__call__`` calls
    ``transformer(hidden_states=latents, timestep=t.expand(N), encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled_prompt_embeds)`` with ``t`` from ``FlowMatchEulerDiscreteScheduler.timesteps``
    (``sigmas * num_train_timesteps``) and hands the output to ``scheduler.step`` unchanged (the module
    docstring: an Euler step of :math:`dx/d\sigma = v`). So

    ``v = transformer(x_t, timestep=num_train_timesteps * t, encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled_embeds).sample``

    on latents ``x_t`` ``(N, C, H, W)`` as the pipeline holds them (the VAE's latents after
    ``(z - shift_factor) * scaling_factor``). ``forward(x_t, t, cond, drop_cond)`` returns ``(v, hidden)``:
    ``v`` float32 (or ``x_t``'s dtype if wider); ``hidden`` the image tokens that ``proj_out`` reads (after the
    final AdaLN ``norm_out``), ``(N, H W / p^2, width)`` with ``p = config.patch_size`` and
    ``width = num_attention_heads * attention_head_dim``, in the raster order of ``PatchEmbed``'s strided
    convolution, which is :func:`trajflow.nn.patches.patchify`'s. ``hidden_features``, ``hidden_layout =
    "tokens"`` and ``patch_size = p`` are what :class:`~trajflow.predictors.FlowMatchingPredictor` reads, so
    :func:`trajflow.finetune.init_from_flow_matching` takes the adapter as it is.

    The condition. ``cond = (prompt_embeds, pooled_embeds)``: ``(N, L, joint_attention_dim)`` and
    ``(N, pooled_projection_dim)``, what the pipeline's ``encode_prompt`` returns (CLIP and T5 features
    concatenated); ``cond_event_dims = (2, 1)``. It is not trajflow's ``(features, mask)``: the network takes no
    mask, padded tokens are attended to as in the pipeline. Rows where ``drop_cond`` is True take the **null
    condition**: ``null_cond`` given at construction (one ``(prompt_embeds (L, D), pooled_embeds (P,))``,
    no batch dim or a batch of 1; the pipeline's choice is the empty prompt's ``encode_prompt("")``, its
    default negative prompt), or **zeros** of the condition's shape without one. ``cond=None`` means the null
    condition everywhere and needs ``null_cond``. The null is a buffer (saved, not trained).

    Arguments:
        transformer: A diffusers ``SD3Transformer2DModel`` (as many output as input channels).
        sample_size: The latent ``H`` or ``(H, W)``, by default the config's ``sample_size``; a multiple of
            the patch size, at most ``pos_embed_max_size`` patches a side.
        null_cond: The null condition of guidance dropout (see above), or None for zeros.
        num_train_timesteps: diffusers' timestep of :math:`t = 1`.
        validate_args: Check ``t`` in [0, 1] (a GPU synchronisation).

    Example:
        >>> from diffusers import SD3Transformer2DModel  # doctest: +SKIP
        >>> net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        ...     pooled_projection_dim=10, pos_embed_max_size=8)  # doctest: +SKIP
        >>> velocity = SD3Velocity(net)  # doctest: +SKIP
        >>> cond = (torch.randn(3, 5, 12), torch.randn(3, 10))  # doctest: +SKIP
        >>> v, hidden = velocity(torch.randn(3, 4, 8, 8), torch.rand(3), cond)  # doctest: +SKIP
        >>> v.shape, hidden.shape  # doctest: +SKIP
        (torch.Size([3, 4, 8, 8]), torch.Size([3, 16, 16]))
    """

    diffusers_class: ClassVar[str] = "SD3Transformer2DModel"
    pooled: ClassVar[bool] = True

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        p = int(config.patch_size)
        height, width = _image_size(
            "sample_size", config.sample_size if sample_size is None else sample_size, self.diffusers_class
        )
        limit = config.pos_embed_max_size
        if height % p or width % p or (limit is not None and max(height, width) > limit * p):
            bound = "" if limit is None else f", at most pos_embed_max_size * patch_size = {limit * p}"
            raise ValueError(
                f"sample_size: expected a latent (H, W) divisible by the patch size {p}{bound}, got {sample_size!r} "
                f"-> {(height, width)}"
            )
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.patch_size = p

    @property
    def transformer(self) -> nn.Module:
        """The wrapped ``SD3Transformer2DModel``."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), **super().settings()}

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        # StableDiffusion3Pipeline.__call__: timestep = t.expand(N), t in scheduler.timesteps = 1000 sigma; the
        # output goes to FlowMatchEulerDiscreteScheduler.step as is (prev = sample + (sigma_next - sigma) * out).
        return self.model(
            hidden_states=x,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=self.timestep(t),
            return_dict=False,
        )[0]
