"""The FLUX family: FLUX.1 (``FluxTransformer2DModel``) and FLUX.2 (``Flux2Transformer2DModel``) adapters."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...checks import check_number
from ...conditioning import Condition
from ...nn.patches import patchify, unpatchify
from .base import _image_size
from .text import _TextTransformerVelocity

__all__ = ["FluxVelocity", "Flux2Velocity"]


class _FluxFamily(_TextTransformerVelocity):
    """What FLUX.1 and FLUX.2 share: a latent ``sample_size``, ``pack x pack`` patches as the transformer's
    tokens (in raster order, :func:`~trajflow.nn.patches.patchify`), position ids and an optional distilled
    guidance embedding. A subclass sets ``pack``, ``default_guidance`` and the ids (:meth:`_image_ids`,
    :meth:`_text_ids`)."""

    pack: ClassVar[int]
    default_guidance: ClassVar[float]

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
            transformer,
            sample_size=sample_size,
            null_cond=null_cond,
            num_train_timesteps=num_train_timesteps,
            validate_args=validate_args,
        )
        self.guidance = self._guidance_setting(transformer.config.guidance_embeds, guidance)
        rows, cols = (side // self.pack for side in self.sample_size)
        self.register_buffer("img_ids", self._image_ids(rows, cols), persistent=False)

    def _set_latent(self, config: Any, sample_size: int | tuple[int, int] | list[int] | None) -> None:
        p = self.pack
        if config.patch_size != 1 or config.in_channels % p**2:
            raise ValueError(
                f"transformer: expected patch_size=1 and in_channels a multiple of {p**2} ({p}x{p}-packed latents), "
                f"got patch_size={config.patch_size}, in_channels={config.in_channels}"
            )
        height, width = _image_size("sample_size", sample_size, self.diffusers_class)
        if height % p or width % p:
            raise ValueError(f"sample_size: expected an even latent (H, W) (2x2 packing), got {(height, width)}")
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels // p**2, height, width))
        self.patch_size = p

    def _guidance_setting(self, embeds: bool, guidance: float | None) -> float | None:
        """The guidance embedding's value (``None`` for a model without one)."""
        if guidance is None:
            return self.default_guidance if embeds else None
        if not embeds:
            raise ValueError(
                f"guidance: this {self.diffusers_class} has no guidance embedding (guidance_embeds=False), expected "
                f"None, got {guidance!r}"
            )
        return check_number("guidance", guidance)  # the distilled guidance scale

    @staticmethod
    def _image_ids(rows: int, cols: int) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _text_ids(length: int) -> Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {"guidance": self.guidance, **super().settings()}

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n = x.shape[0]
        # The pipelines pass guidance = full([1], scale).expand(N) in float32 (None without the embedding)
        guidance = (
            None if self.guidance is None else torch.full((n,), self.guidance, device=x.device, dtype=torch.float32)
        )
        out = self.model(
            hidden_states=patchify(x, self.pack),  # == _pack_latents: (N, C, H, W) -> (N, H W / p^2, p^2 C)
            encoder_hidden_states=prompt,
            **({"pooled_projections": pooled} if self.pooled else {}),
            # __call__: timestep = t.expand(N).to(latents.dtype) passed as timestep / 1000 (forward multiplies it)
            timestep=self.timestep(t).to(x.dtype) / 1000,
            img_ids=self.img_ids.to(x.device),
            txt_ids=self._text_ids(prompt.shape[1]).to(x.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpatchify(out, self.pack, self.event_shape)  # == _unpack_latents


class FluxVelocity(_FluxFamily):
    r"""A diffusers ``FluxTransformer2DModel`` (FLUX.1) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``pipeline_flux.py``, ``FluxPipeline``):

    * latents: ``_pack_latents`` packs 2x2 patches of the ``(N, C, H, W)`` noise,
      ``view(N, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5)`` -> ``(N, H W / 4, 4 C)``, which is
      :func:`trajflow.nn.patches.patchify` ``(x, 2)``; trajflow's latent is the unpacked ``(C, H, W)``,
      ``C = in_channels / 4`` (the scheduler acts per element, so the packing commutes with it).
    * ids: ``_prepare_latent_image_ids`` gives patch ``(i, j)`` the id ``(0, i, j)``; text ids are zeros ``(L, 3)``.
    * time: ``__call__`` passes ``timestep = t / 1000`` (``t`` in ``scheduler.timesteps``, :math:`1000 \sigma`)
      and ``forward`` multiplies by 1000: the adapter passes ``num_train_timesteps * t / 1000``.
    * guidance: a guidance-distilled model (``guidance_embeds=True``, FLUX.1-dev) gets ``guidance =
      full((N,), guidance_scale)`` (default 3.5); trajflow's own classifier-free ``guidance`` is applied on top.
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0` (packed), unpacked here.

    ``forward`` returns ``(v, hidden)`` as :class:`SD3Velocity`'s, ``hidden`` ``(N, H W / 4, width)``;
    ``patch_size = 2`` (the packing). The condition and its null are SD3's (T5 and CLIP embeddings); FLUX.1 was
    not trained with a null prompt, which matters once an NTM is fine-tuned with guidance dropout.

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
    pack: ClassVar[int] = 2
    default_guidance: ClassVar[float] = 3.5  # FluxPipeline.__call__(guidance_scale=3.5)

    @staticmethod
    def _image_ids(rows: int, cols: int) -> Tensor:
        # FluxPipeline._prepare_latent_image_ids(N, H / 2, W / 2): id (0, row, col) of each packed token.
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        return ids.reshape(-1, 3)

    @staticmethod
    def _text_ids(length: int) -> Tensor:
        return torch.zeros(length, 3)  # FluxPipeline.encode_prompt: text_ids


class Flux2Velocity(_FluxFamily):
    r"""A diffusers ``Flux2Transformer2DModel`` (FLUX.2 dev / klein) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``Flux2KleinPipeline``; ``Flux2Pipeline`` is the same):

    * latents: ``prepare_latents`` draws its noise already 2x2-patchified, ``(N, 4 C, H / 2, W / 2)`` (where
      the VAE's batch-norm statistics normalise it), and ``_pack_latents`` flattens it to tokens in raster
      order. trajflow's latent is that ``(C', H', W')``, ``C' = in_channels``, with ``patch_size = 1``.
    * ids: token ``(i, j)`` has the id ``(0, i, j, 0)``, text token ``l`` the id ``(0, 0, 0, l)``.
    * time: as FLUX.1, the adapter passes ``num_train_timesteps * t / 1000``.
    * guidance: ``Flux2Pipeline`` passes ``guidance = full((N,), guidance_scale)`` (default 4.0) to models with
      ``guidance_embeds``; klein has no guidance embedding.
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0`.

    The condition is ``prompt_embeds`` ``(N, L, joint_attention_dim)`` alone (no pooled embedding,
    ``cond_event_dims = 2``), its null ``null_cond`` ``(L, D)`` (klein's negative prompt is ``""``) or zeros;
    ``hidden`` is ``(N, H' W', width)``.

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
    pack: ClassVar[int] = 1
    default_guidance: ClassVar[float] = 4.0  # Flux2Pipeline.__call__(guidance_scale=4.0)

    @staticmethod
    def _image_ids(rows: int, cols: int) -> Tensor:
        # Flux2KleinPipeline._prepare_latent_ids: cartesian_prod(t=[0], h, w, l=[0]) -> (H' W', 4)
        return torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1))

    @staticmethod
    def _text_ids(length: int) -> Tensor:
        # Flux2KleinPipeline._prepare_text_ids: cartesian_prod(t=[0], h=[0], w=[0], l) -> (L, 4)
        zero = torch.arange(1)
        return torch.cartesian_prod(zero, zero, zero, torch.arange(length))
