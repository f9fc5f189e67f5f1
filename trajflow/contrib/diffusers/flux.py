"""The FLUX family: FLUX.1 (``FluxTransformer2DModel``) and FLUX.2 (``Flux2Transformer2DModel``) adapters."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...conditioning import Condition
from ...nn.patches import patchify, unpatchify
from .text import _image_size, _TextTransformerVelocity

__all__ = ["FluxVelocity", "Flux2Velocity"]


def _guidance_setting(config: Any, guidance: float | None, default: float, name: str) -> float | None:
    """The guidance-embedding value of a guidance-distilled FLUX (``None`` for one without the embedding)."""
    if not config.guidance_embeds:
        if guidance is not None:
            raise ValueError(
                f"guidance: this {name} has no guidance embedding (guidance_embeds=False), expected None, got "
                f"{guidance!r}"
            )
        return None
    if guidance is None:
        return default
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance == guidance:
        raise ValueError(f"guidance: expected a number (the distilled guidance scale), got {guidance!r}")
    return float(guidance)


class _FluxFamily(_TextTransformerVelocity):
    """What FLUX.1 and FLUX.2 share: a latent ``sample_size`` and an optional distilled guidance embedding."""

    sample_size: tuple[int, int]
    guidance: float | None

    @property
    def transformer(self) -> nn.Module:
        """The wrapped FLUX transformer."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), "guidance": self.guidance, **super().settings()}

    def _guidance(self, n: int, device: torch.device) -> Tensor | None:
        """The guidance embedding's input, as the pipelines pass it: ``torch.full([1], scale).expand(N)``, float32."""
        if self.guidance is None:
            return None
        return torch.full((n,), self.guidance, device=device, dtype=torch.float32)


class FluxVelocity(_FluxFamily):
    r"""A diffusers ``FluxTransformer2DModel`` (FLUX.1) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``pipeline_flux.py``, ``FluxPipeline``):

    * latents: ``prepare_latents`` draws ``(N, C, H, W)`` noise and ``_pack_latents`` packs 2x2 patches,
      ``view(N, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5)`` -> ``(N, H W / 4, 4 C)``: raster order, channels
      ``(c, dy, dx)``, which is :func:`trajflow.nn.patches.patchify` ``(x, 2)``. trajflow's latent is the unpacked
      ``(C, H, W)`` with ``C = in_channels / 4`` (``_unpack_latents`` is the inverse, :func:`unpatchify`);
      the scheduler acts per element, so the packing commutes with it.
    * ids: ``_prepare_latent_image_ids`` gives the token of patch row ``i``, column ``j`` the id ``(0, i, j)``;
      ``encode_prompt`` gives text ids zeros ``(L, 3)``.
    * time: ``__call__`` passes ``timestep = t.expand(N).to(latents.dtype) / 1000`` (``t`` in
      ``scheduler.timesteps``, :math:`1000 \sigma`) and ``FluxTransformer2DModel.forward`` multiplies by 1000
      again: the adapter passes ``num_train_timesteps * t / 1000``, i.e. :math:`\sigma = t` itself.
    * guidance: a guidance-distilled model (``guidance_embeds=True``, FLUX.1-dev) gets
      ``guidance = full((N,), guidance_scale)`` (``forward`` multiplies it by 1000 too); ``guidance`` here,
      the pipeline's default 3.5. trajflow's own classifier-free ``guidance`` is applied on top of it.
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0` (packed), unpacked here.

    ``forward(x_t, t, cond, drop_cond)`` returns ``(v, hidden)``, ``v`` ``(N, C, H, W)`` float32 (or wider) and
    ``hidden`` the image tokens ``proj_out`` reads, ``(N, H W / 4, width)``; ``patch_size = 2`` (the packing).
    The condition is SD3's (:class:`SD3Velocity`): ``(prompt_embeds (N, L, joint_attention_dim),
    pooled_embeds (N, pooled_projection_dim))`` (T5 and CLIP), ``cond_event_dims = (2, 1)``, a null condition
    ``null_cond`` or zeros. FLUX.1 was not trained with a null prompt; the null matters once an NTM is
    fine-tuned with guidance dropout.

    Arguments:
        transformer: A diffusers ``FluxTransformer2DModel`` with ``patch_size = 1`` and ``in_channels`` a
            multiple of 4 (the packed latent, as FLUX.1's 64 = 4 x 16).
        sample_size: The latent ``H`` or ``(H, W)`` (even; FLUX's config has none): the VAE latent, 1/8 of the
            image side for FLUX.1's VAE.
        guidance: The distilled guidance scale of a model with ``guidance_embeds`` (default 3.5, the pipeline's);
            must be None for one without.
        null_cond, num_train_timesteps, validate_args: As :class:`SD3Velocity`.
    """

    diffusers_class: ClassVar[str] = "FluxTransformer2DModel"
    pooled: ClassVar[bool] = True
    default_guidance: ClassVar[float] = 3.5  # FluxPipeline.__call__(guidance_scale=3.5)

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        guidance: float | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        if config.patch_size != 1 or config.in_channels % 4:
            raise ValueError(
                f"transformer: expected patch_size=1 and in_channels a multiple of 4 (2x2-packed latents, as "
                f"FluxPipeline._pack_latents), got patch_size={config.patch_size}, in_channels={config.in_channels}"
            )
        height, width = _image_size("sample_size", sample_size, self.diffusers_class)
        if height % 2 or width % 2:
            raise ValueError(f"sample_size: expected an even latent (H, W) (2x2 packing), got {(height, width)}")
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels // 4, height, width))
        self.patch_size = 2
        self.guidance = _guidance_setting(config, guidance, self.default_guidance, self.diffusers_class)
        # FluxPipeline._prepare_latent_image_ids(N, H / 2, W / 2): id (0, row, col) of each packed token.
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        self.register_buffer("img_ids", ids.reshape(-1, 3), persistent=False)

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n = x.shape[0]
        tokens = patchify(x, 2)  # == FluxPipeline._pack_latents: (N, C, H, W) -> (N, H W / 4, 4 C)
        guidance = self._guidance(n, x.device)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            # FluxPipeline.__call__: timestep = t.expand(N).to(latents.dtype), passed as timestep / 1000
            timestep=self.timestep(t).to(x.dtype) / 1000,
            img_ids=self.img_ids.to(x.device),
            txt_ids=torch.zeros(prompt.shape[1], 3, device=x.device),  # FluxPipeline.encode_prompt: text_ids
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpatchify(out, 2, self.event_shape)  # == FluxPipeline._unpack_latents


class Flux2Velocity(_FluxFamily):
    r"""A diffusers ``Flux2Transformer2DModel`` (FLUX.2 dev / klein) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``pipeline_flux2_klein.py``, ``Flux2KleinPipeline``; ``Flux2Pipeline`` is
    the same):

    * latents: ``prepare_latents`` draws its noise already 2x2-patchified, ``(N, 4 C, H / 2, W / 2)``
      (``_patchify_latents`` maps the VAE latent there, and the VAE's batch-norm statistics normalise it in
      that space), and ``_pack_latents`` flattens it to tokens ``reshape(N, C', H' W').permute(0, 2, 1)``.
      trajflow's latent is that patchified ``(C', H', W')`` with ``C' = in_channels``: the flow runs there, the
      tokens are its raster order and ``patch_size = 1``.
    * ids: ``_prepare_latent_ids`` gives token ``(i, j)`` the id ``(0, i, j, 0)``, ``_prepare_text_ids`` gives
      text token ``l`` the id ``(0, 0, 0, l)``.
    * time: as FLUX.1, ``timestep = t / 1000`` with ``t`` in ``scheduler.timesteps`` and ``forward``
      multiplies by 1000: the adapter passes ``num_train_timesteps * t / 1000``.
    * guidance: ``Flux2Pipeline`` passes ``guidance = full((N,), guidance_scale)`` (default 4.0) to models
      with ``guidance_embeds``; ``Flux2KleinPipeline`` passes None (klein has no guidance embedding).
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0`.

    The condition is ``prompt_embeds`` ``(N, L, joint_attention_dim)`` alone (FLUX.2 has no pooled
    embedding), ``cond_event_dims = 2``; the null condition is ``null_cond`` (``(L, D)``; the klein
    pipeline's negative prompt is ``""``) or zeros. ``hidden`` is ``(N, H' W', width)``, what ``proj_out``
    reads.

    Arguments:
        transformer: A diffusers ``Flux2Transformer2DModel`` with ``patch_size = 1``.
        sample_size: The token grid ``H'`` or ``(H', W')`` (FLUX.2's config has none): the VAE latent's side / 2,
            i.e. the image side / 16.
        guidance: The distilled guidance scale of a model with ``guidance_embeds`` (default 4.0, the pipeline's);
            must be None for one without.
        null_cond, num_train_timesteps, validate_args: As :class:`SD3Velocity`.
    """

    diffusers_class: ClassVar[str] = "Flux2Transformer2DModel"
    pooled: ClassVar[bool] = False
    default_guidance: ClassVar[float] = 4.0  # Flux2Pipeline.__call__(guidance_scale=4.0)

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        guidance: float | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        if config.patch_size != 1:
            raise ValueError(
                f"transformer: expected patch_size=1 (Flux2Pipeline packs 1x1 tokens), got {config.patch_size}"
            )
        height, width = _image_size("sample_size", sample_size, self.diffusers_class)
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.patch_size = 1
        self.guidance = _guidance_setting(config, guidance, self.default_guidance, self.diffusers_class)
        # Flux2KleinPipeline._prepare_latent_ids: cartesian_prod(t=[0], h, w, l=[0]) -> (H' W', 4)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
        self.register_buffer("img_ids", ids, persistent=False)

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)  # == Flux2KleinPipeline._pack_latents
        # Flux2KleinPipeline._prepare_text_ids: cartesian_prod(t=[0], h=[0], w=[0], l) -> (L, 4)
        zero = torch.zeros(1, dtype=torch.long)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(prompt.shape[1])).to(x.device)
        guidance = self._guidance(n, x.device)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=prompt,
            # Flux2KleinPipeline.__call__: timestep = t.expand(N).to(latents.dtype), passed as timestep / 1000
            timestep=self.timestep(t).to(x.dtype) / 1000,
            img_ids=self.img_ids.to(x.device),
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(n, c, h, w)  # == _unpack_latents_with_ids for raster ids
