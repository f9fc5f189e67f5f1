"""A diffusers pipeline's VAE as the pipeline decodes latents, in float32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...checks import check_count, check_tensor

__all__ = ["PipelineVAE"]


def _is_autoencoder(vae: object) -> bool:
    return isinstance(vae, nn.Module) and hasattr(vae, "config") and hasattr(vae, "decode")


def _checked_layout(vae: object, layout: str | None) -> str:
    """The latent layout of ``vae`` (``layout``, else read from its class), checked against what it is."""
    if not _is_autoencoder(vae):
        raise ValueError(f"vae: expected a diffusers autoencoder (AutoencoderKL, ...), got {type(vae).__name__}")
    layout = layout or ("flux2" if type(vae).__name__ == "AutoencoderKLFlux2" else "scaled")
    if layout not in ("scaled", "flux2"):
        raise ValueError(f"layout: expected 'scaled' or 'flux2', got {layout!r}")
    if layout == "flux2" and not isinstance(getattr(vae, "bn", None), nn.BatchNorm2d):
        raise ValueError(f"vae: the 'flux2' layout needs an AutoencoderKLFlux2 (with a bn), got {type(vae).__name__}")
    return layout


class PipelineVAE(nn.Module):
    r"""A diffusers pipeline's VAE as its pipeline maps latents to images and back, in **float32**.

    The VAE is cast to float32, frozen and run with autocast off whatever the model's precision (an fp16 VAE
    decode gives NaNs or black images). Two latent layouts:

    * ``"scaled"`` (``AutoencoderKL``: SD3, FLUX.1 and most others): ``(z - shift_factor) * scaling_factor``
      with ``z`` the VAE's latent (``StableDiffusion3Pipeline`` / ``FluxPipeline``, after unpacking).
    * ``"flux2"`` (``AutoencoderKLFlux2``): the VAE's latent 2x2-patchified (``(4 C, H / 2, W / 2)``,
      ``Flux2Pipeline._patchify_latents``) and normalised by the VAE's batch-norm statistics,
      ``(z - running_mean) / sqrt(running_var + batch_norm_eps)`` (``Flux2KleinPipeline.__call__``).

    ``encode`` takes images in ``[-1, 1]`` to the latents of the posterior mean (or of a posterior sample with
    ``generator``); ``decode`` returns images in ``[-1, 1]``, unclipped (:meth:`to_unit` maps them to
    ``[0, 1]`` as ``VaeImageProcessor.postprocess`` does).

    Arguments:
        vae: The pipeline's ``AutoencoderKL`` or ``AutoencoderKLFlux2``.
        layout: ``"scaled"`` or ``"flux2"``; by default from the VAE's class.
    """

    def __init__(self, vae: nn.Module, *, layout: str | None = None) -> None:
        super().__init__()
        self.layout = _checked_layout(vae, layout)
        self.vae = vae.to(torch.float32).eval().requires_grad_(False)
        config = vae.config
        self.vae_scale_factor = 2 ** (len(config.block_out_channels) - 1)  # pixels per VAE latent, as the pipelines
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        flux2 = self.layout == "flux2"  # 2x2 patches of the VAE's latent
        self.channels = int(config.latent_channels) * (4 if flux2 else 1)
        self.factor = self.vae_scale_factor * (2 if flux2 else 1)  # pixels per latent

    def train(self, mode: bool = True) -> PipelineVAE:
        """The VAE stays in eval mode (its batch-norm statistics are the latent normalisation)."""
        super().train(mode)
        self.vae.eval()
        return self

    def latent_shape(self, height: int, width: int | None = None) -> torch.Size:
        """``(C, H / f, W / f)`` of the latents of ``height x width`` px images (``f``: :attr:`factor`)."""
        width = height if width is None else width
        for name, side in (("height", height), ("width", width)):
            check_count(name, side)
            if side % self.factor:
                raise ValueError(
                    f"{name}: expected a positive multiple of {self.factor} (the pipeline's pixels per latent), "
                    f"got {side!r}"
                )
        return torch.Size((self.channels, height // self.factor, width // self.factor))

    def _bn(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)
        return mean, std

    @torch.no_grad()
    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(N, 3, H, W)`` in ``[-1, 1]`` -> latents ``(N, C, H / f, W / f)``, float32."""
        check_tensor("images", images)
        if images.dim() != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"images: expected (N, {self.vae.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        with torch.autocast(device_type=images.device.type, enabled=False):
            dist = self.vae.encode(images.float()).latent_dist
            z = dist.mean if generator is None else dist.sample(generator)
            if self.layout == "scaled":
                return (z - self.shift_factor) * self.scaling_factor
            n, c, h, w = z.shape  # Flux2Pipeline._patchify_latents, then the batch-norm normalisation
            z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
            mean, std = self._bn(z)
            return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(N, C, h, w)`` -> images ``(N, 3, h f, w f)`` in ``[-1, 1]`` (unclipped), float32."""
        check_tensor("latents", latents)
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents: expected (N, {self.channels}, h, w), got shape {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            z = latents.float()
            if self.layout == "scaled":
                z = z / self.scaling_factor + self.shift_factor
            else:
                mean, std = self._bn(z)
                n, c, h, w = z.shape  # Flux2Pipeline._unpatchify_latents
                z = (z * std + mean).reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
                z = z.reshape(n, c // 4, 2 * h, 2 * w)
            return self.vae.decode(z, return_dict=False)[0].float()

    @staticmethod
    def to_unit(images: Tensor) -> Tensor:
        """``[-1, 1]`` -> ``[0, 1]``, clipped (``VaeImageProcessor.denormalize``)."""
        return (images / 2 + 0.5).clamp(0, 1)
