"""Text-to-image transformers as velocity models: what SD3 and FLUX share, and SD3's adapter."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...conditioning import Condition, CondPart, CondSpec
from .base import DiffusersVelocity, _image_size

__all__ = ["SD3Velocity"]


def _null_part(given: Tensor, dims: int, features: int | None, what: str) -> Tensor:
    """A part of the null condition, a batch of 1 dropped, checked (``dims`` dims, the last ``features``), copied."""
    part = given.detach()
    if part.dim() == dims + 1 and part.shape[0] == 1:
        part = part[0]
    if part.dim() != dims or part.shape[-1] != features or not part.is_floating_point():
        raise ValueError(f"null_cond: expected {what}, got {part.dtype} of shape {tuple(given.shape)}")
    return part.clone()


def _null_parts(null_cond: Condition, pooled: bool) -> tuple[Tensor, ...]:
    """The tensors of a null condition, ``(prompt, pooled)`` or ``(prompt,)``, or a ValueError saying the form."""
    parts = null_cond if isinstance(null_cond, tuple) else (null_cond,)
    if len(parts) != 1 + pooled or not all(isinstance(p, Tensor) for p in parts):
        form = "(prompt_embeds (L, D), pooled_embeds (P,))" if pooled else "a tensor prompt_embeds (L, D)"
        raise ValueError(f"null_cond: expected {form} (one condition, no batch dim), got {type(null_cond).__name__}")
    return parts


def _where(drop: Tensor, null: Tensor | None, c: Tensor | None) -> Tensor | None:
    """``c`` ``(n, ...)`` with its rows where ``drop`` is True replaced by ``null`` (None: no such part)."""
    return None if c is None else torch.where(drop.reshape(-1, *[1] * (c.dim() - 1)), null, c)


class _TextTransformerVelocity(DiffusersVelocity):
    r"""The part the SD3 / FLUX adapters share: the text condition, its null, the hidden-state hook, ``forward``.

    A subclass sets ``pooled`` (whether the network takes pooled embeddings), ``event_shape``, ``patch_size``
    and ``sample_size`` (:meth:`_set_latent`), and implements :meth:`_velocity` (the network call in trajflow's
    layout: latents ``(N, C, H, W)`` in, :math:`v` of the same shape out).
    """

    pooled: ClassVar[bool] = True
    model_argument: ClassVar[str] = "transformer"
    sample_size: tuple[int, int]

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(transformer, num_train_timesteps=num_train_timesteps, validate_args=validate_args)
        config = transformer.config
        if (config.out_channels or config.in_channels) != config.in_channels:
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
        self._set_latent(config, sample_size)

    def _set_latent(self, config: Any, sample_size: int | tuple[int, int] | list[int] | None) -> None:
        """Set ``sample_size``, ``event_shape`` and ``patch_size`` from the network's config."""
        raise NotImplementedError

    @property
    def transformer(self) -> nn.Module:
        """The wrapped transformer."""
        return self.model

    # -- the text condition ------------------------------------------------------------------------------------

    def _parse_null(self, null_cond: Condition | None) -> tuple[Tensor | None, Tensor | None]:
        """``null_cond`` without batch dims (or with a batch of 1), checked: ``(prompt (L, D), pooled (P,))``."""
        if null_cond is None:
            return None, None
        parts = _null_parts(null_cond, self.pooled)
        what = f"prompt embeddings (L, {self.text_features}) (the network's joint_attention_dim)"
        prompt = _null_part(parts[0], 2, self.text_features, what)
        what = f"pooled embeddings ({self.pooled_features},) (the network's pooled_projection_dim)"
        return prompt, _null_part(parts[1], 1, self.pooled_features, what) if self.pooled else None

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
        if cond is None:  # the null condition everywhere (check_cond made sure there is one)
            pooled = self.null_pooled_embeds
            return self.null_prompt_embeds.expand(n, -1, -1), None if pooled is None else pooled.expand(n, -1)
        prompt, pooled = cond if isinstance(cond, tuple) else (cond, None)
        if drop_cond is None:
            return prompt, pooled
        null_prompt, null_pooled = self._nulls(prompt, pooled)
        drop = drop_cond.to(prompt.device)
        return _where(drop, null_prompt, prompt), _where(drop, null_pooled, pooled)

    def _nulls(self, prompt: Tensor, pooled: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """What the dropped rows of ``(prompt, pooled)`` take: the null condition, else zeros."""
        null, null_pooled = self.null_prompt_embeds, self.null_pooled_embeds
        if null is None:
            return prompt.new_zeros(()), prompt.new_zeros(())
        if null.shape[0] != prompt.shape[1]:
            raise ValueError(
                f"null_cond: its {null.shape[0]} text tokens cannot replace dropped rows of a condition with "
                f"{prompt.shape[1]} tokens; encode the null prompt padded to the same length"
            )
        return null.to(prompt), None if pooled is None else null_pooled.to(pooled)

    # -- saving ------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        length = None if self.null_prompt_embeds is None else int(self.null_prompt_embeds.shape[0])
        return {"sample_size": list(self.sample_size), "null_text_length": length, **super().settings()}

    @classmethod
    def _settings_from_config(cls, model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
        """A null condition of ``null_text_length`` tokens is zeros until the weights load."""
        length = settings.pop("null_text_length", None)
        if length is not None:
            prompt = torch.zeros(length, model.config.joint_attention_dim)
            pooled = torch.zeros(model.config.pooled_projection_dim) if cls.pooled else None
            settings["null_cond"] = (prompt, pooled) if cls.pooled else prompt
        return settings

    # -- the call ----------------------------------------------------------------------------------------------

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape ``(N, C, H, W)`` and ``hidden`` ``(N, L_img, width)``."""
        self._check_inputs(x_t, t)
        prompt, pooled = self._text(cond, drop_cond, x_t.shape[0])
        dtype = self.model.dtype
        prompt = prompt.to(device=x_t.device, dtype=dtype)
        pooled = None if pooled is None else pooled.to(device=x_t.device, dtype=dtype)
        # hidden: the image tokens the output projection reads (after the final AdaLN norm_out), (N, L_img, width)
        v, hidden = self._hooked(self.model.proj_out, lambda: self._velocity(x_t.to(dtype), t, prompt, pooled))
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), hidden


def _sd3_size(size: object, p: int, limit: int | None, what: str) -> tuple[int, int]:
    """The latent ``(H, W)`` of ``size``: a multiple of the patch size ``p``, at most ``limit`` patches a side."""
    height, width = _image_size("sample_size", size, what)
    if height % p or width % p or (limit is not None and max(height, width) > limit * p):
        bound = "" if limit is None else f", at most pos_embed_max_size * patch_size = {limit * p}"
        raise ValueError(
            f"sample_size: expected a latent (H, W) divisible by the patch size {p}{bound}, got {size!r} "
            f"-> {(height, width)}"
        )
    return height, width


class SD3Velocity(_TextTransformerVelocity):
    r"""A diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) as a text-conditional velocity model.

    The conversion (diffusers 0.42): ``StableDiffusion3Pipeline.__call__`` calls ``transformer(hidden_states=
    latents, timestep=t.expand(N), encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds)``
    with ``t`` in ``scheduler.timesteps`` (``sigmas * num_train_timesteps``) and hands the output to
    ``scheduler.step`` unchanged, so ``v = transformer(x_t, timestep=num_train_timesteps * t, ...).sample`` on
    the latents as the pipeline holds them (``(z - shift_factor) * scaling_factor``).

    ``forward(x_t, t, cond, drop_cond)`` returns ``(v, hidden)``: ``v`` float32 (or ``x_t``'s dtype if wider);
    ``hidden`` the image tokens ``proj_out`` reads (after the final AdaLN ``norm_out``), ``(N, H W / p^2,
    width)`` with ``p = config.patch_size``, ``width = num_attention_heads * attention_head_dim``, in
    :func:`trajflow.nn.patches.patchify`'s raster order. ``hidden_features``, ``hidden_layout = "tokens"`` and
    ``patch_size`` are what :class:`~trajflow.predictors.FlowMatchingPredictor` reads, so
    :func:`trajflow.finetune.init_from_flow_matching` takes the adapter as it is.

    The condition is ``(prompt_embeds (N, L, joint_attention_dim), pooled_embeds (N, pooled_projection_dim))``
    as the pipeline's ``encode_prompt`` returns them (no mask: padded tokens are attended to, as in the
    pipeline), ``cond_event_dims = (2, 1)``. Rows where ``drop_cond`` is True take the **null condition**:
    ``null_cond`` (one ``(prompt_embeds (L, D), pooled_embeds (P,))``, no batch dim or a batch of 1; the
    pipeline's is the empty prompt's ``encode_prompt("")``), or **zeros** without one. ``cond=None`` means the
    null condition everywhere and needs ``null_cond``. The null is a buffer (saved, not trained).

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

    def _set_latent(self, config: Any, sample_size: int | tuple[int, int] | list[int] | None) -> None:
        p = int(config.patch_size)
        size = config.sample_size if sample_size is None else sample_size
        height, width = _sd3_size(size, p, config.pos_embed_max_size, self.diffusers_class)
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.patch_size = p

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
