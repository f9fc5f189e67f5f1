"""Sampling a text-to-image model: :func:`generate` (NTM's raw, full and fast paths, or flow matching's ODE)
and :func:`save_image_grid` (one PNG of many samples). The command line over them is ``sample.py``."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from examples.t2i.vae import VAE
from trajflow.baselines.flow_matching import euler_sample, heun_sample
from trajflow.checkpoint import atomic_write
from trajflow.data.images import from_unit_range
from trajflow.denoise import fast_sample, sample_denoised
from trajflow.model import NTM
from trajflow.process import SAMPLE_T_MIN, time_grid
from trajflow.train import mix_seed

__all__ = ["SAMPLE_PATHS", "DEFAULT_DENOISE_T_MIN", "generate", "save_image_grid"]

#: The ways from NTM's cleanest latent to an image (see :func:`generate`).
SAMPLE_PATHS: tuple[str, ...] = ("raw", "full", "fast")
#: The cleanest time of the denoising sampling paths: :data:`trajflow.process.SAMPLE_T_MIN` (NTM: 0.02; at 0
#: denoising changes nothing). Kept under this name for the recipe's callers.
DEFAULT_DENOISE_T_MIN = SAMPLE_T_MIN


@torch.no_grad()
def generate(
    model: nn.Module,
    encoder: Any,
    captions: list[str],
    *,
    steps: int = 4,
    guidance: float = 3.0,
    seed: int = 0,
    t_min: float = SAMPLE_T_MIN,
    shift: float = 1.0,
    batch_size: int = 64,
    vae: VAE | None = None,
    sampler: str = "euler",
    progress: bool = False,
    path: str = "raw",
    denoiser: nn.Module | None = None,
) -> Tensor:
    """Images for ``captions``: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` on the CPU.

    NTM: ``steps`` predictor steps on the grid ``time_grid(steps, t_min, shift)`` with the clipped Gaussian
    guidance, then one of three ``path`` s to the image:

    * ``"raw"``: the transporter's inverse at the cleanest level (:meth:`trajflow.NTM.sample`, Algorithm 2
      without denoising);
    * ``"full"``: :func:`~trajflow.denoise.sample_denoised`, the KV-cached inverse at every level and
      trajectory score denoising (Algorithm 3; the score is the conditional model's);
    * ``"fast"``: :func:`~trajflow.denoise.fast_sample`, no inverse: the learned ``denoiser`` maps the
      cleanest latent to the image (train it with :func:`~examples.t2i.distill.distill_t2i` at the
      same ``steps`` and ``t_min``).

    Denoising needs ``t_min > 0`` (0.02 in NTM): at ``t_min = 0`` the full path returns the raw sample
    unchanged. Flow matching (``"raw"`` only): ``steps`` Euler (or Heun) steps with ``(1 + w) v_c - w v_u``.
    Batch ``i`` draws its noise from seed ``(seed, i)``, so a result depends on ``seed`` and ``batch_size``
    only.
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler: expected 'euler' or 'heun', got {sampler!r}")
    if path not in SAMPLE_PATHS:
        raise ValueError(f"path: expected one of {list(SAMPLE_PATHS)}, got {path!r}")
    if path != "raw" and not isinstance(model, NTM):
        raise ValueError(f"path: {path!r} needs an NTM (the flow-matching baseline samples with path 'raw')")
    if path == "fast" and denoiser is None:
        raise ValueError("denoiser: path 'fast' needs a learned denoiser (examples/t2i/distill.py, load_denoiser)")
    if path != "raw" and t_min <= 0:
        warnings.warn(
            f"t_min: {t_min} makes trajectory denoising a no-op (row 0 of the noise covariance vanishes at t_min = 0); "
            "NTM samples at 0.02",
            stacklevel=2,
        )
    device = next(model.parameters()).device
    if denoiser is not None:
        denoiser = denoiser.to(device).eval()
    was_training = model.training
    model.eval()
    out = []
    chunks = range(0, len(captions), batch_size)
    for i, start in enumerate(tqdm(chunks, desc="sample", disable=not progress, dynamic_ncols=True)):
        chunk = list(captions[start : start + batch_size])
        feats, mask = encoder.encode(chunk)
        cond = (feats.to(device, torch.float32), mask.to(device))
        # A generator per batch: the result depends on (seed, i) only, and the global RNG is never touched.
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, i, 4))
        if isinstance(model, NTM):
            if path == "raw":
                x = model.sample((), cond=cond, steps=steps, t_min=t_min, shift=shift, guidance=guidance, generator=g)
            elif path == "full":
                dist = model.distribution(time_grid(steps, t_min, shift, device=device), cond, guidance=guidance)
                x = sample_denoised(dist, (), generator=g)
            else:
                x = fast_sample(
                    model,
                    denoiser,
                    (),
                    cond=cond,
                    steps=steps,
                    t_min=t_min,
                    shift=shift,
                    guidance=guidance,
                    generator=g,
                )
        else:
            noise = torch.randn((len(chunk), *model.event_shape), generator=g, device=device)
            fn = euler_sample if sampler == "euler" else heun_sample
            x = fn(model, noise, steps, cond=cond, guidance=guidance, shift=shift)
        if vae is not None:
            x = vae.decode(x)
        out.append(x.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def save_image_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, min_tile: int = 64) -> Path:
    """Write ``(N, 3, H, W)`` images in ``[-1, 1]`` as one PNG grid (tiles upscaled by an integer factor, nearest
    neighbour, to at least ``min_tile`` px so that 16 px samples stay visible); atomic."""
    n = images.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image, got none")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    _, _, h, w = images.shape
    k = max(1, math.ceil(min_tile / h))
    pad = 2
    canvas = np.full((ncol * (h * k + pad) + pad, nrow * (w * k + pad) + pad, 3), 255, dtype=np.uint8)
    pix = from_unit_range(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = pix[i].repeat(k, axis=0).repeat(k, axis=1)
        y, x = pad + r * (h * k + pad), pad + c * (w * k + pad)
        canvas[y : y + h * k, x : x + w * k] = tile
    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()))
