"""The optional latent space: a frozen local diffusers ``AutoencoderKL`` (:class:`VAE`), and the shape of what
the model sees, pixels or latents (:func:`data_shape`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from examples.t2i.config import T2IConfig

__all__ = ["VAE", "data_shape"]


class VAE:
    """A frozen diffusers ``AutoencoderKL`` read from a **local** folder; maps images <-> scaled latents.

    ``encode`` takes images in ``[-1, 1]`` and returns ``(mean latent - shift) * scale`` (the posterior mean:
    deterministic, so resumed runs see the same latents); ``decode`` inverts it to images in ``[-1, 1]``.

    Raises ``ImportError`` (naming ``pip install diffusers``) without diffusers and ``ValueError`` when
    ``path`` is not an existing folder: nothing is ever fetched from a hub.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", scale: float | None = None) -> None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"vae: expected a local folder holding a diffusers AutoencoderKL (config.json and weights), got "
                f"{str(path)!r}, which does not exist; nothing is downloaded from a hub"
            )
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError(
                "vae: --vae needs the diffusers package: pip install diffusers. The path must be a local folder "
                "with an AutoencoderKL (config.json + weights); it is loaded with local_files_only=True and "
                "nothing is downloaded"
            ) from e
        self.model = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.scale = float(scale if scale is not None else getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.path = str(path)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, H / f, W / f)`` of the latents of ``resolution`` px images."""
        if resolution % self.factor:
            raise ValueError(
                f"data.resolution: expected a multiple of the VAE's downsampling factor {self.factor}, got {resolution}"
            )
        return (self.channels, resolution // self.factor, resolution // self.factor)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, C, H / f, W / f)`` scaled latents (float32)."""
        dist = self.model.encode(images.to(self.model.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        z = latents.to(self.model.dtype) / self.scale + self.shift
        return self.model.decode(z).sample.float().clamp(-1, 1)


def data_shape(config: T2IConfig, vae: VAE | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of what the model sees: pixels, or the VAE's latents.

    Example:
        >>> data_shape(T2IConfig.from_dict({"data": {"resolution": 16}, "model": {"patch_size": 4}}))
        (3, 16, 16)
    """
    r = config.data.resolution
    if vae is None:
        return (3, r, r)
    shape = vae.latent_shape(r)
    m = config.model
    for name, patch in (("patch_size", m.patch_size), ("transporter_patch_size", m.transporter_patch_size)):
        if patch is not None and shape[1] % patch:
            raise ValueError(
                f"model.{name}: expected a divisor of the latent side {shape[1]} (data.resolution={r} over the VAE's "
                f"factor {vae.factor}), got {patch}"
            )
    return shape
