r"""The two sampling paths that end in a denoising step (NTM Algorithm 2): the full one, which inverts the
transporter at every level and denoises with the trajectory's score, and the fast one, which skips the
inverse and runs a learned denoiser once."""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning import Condition, align_cond, check_cond
from ..distribution import TrajectoryDistribution
from ..model import NTM
from ..process import SAMPLE_T_MIN, time_grid
from .networks import LearnedDenoiser
from .score import trajectory_score_denoise

__all__ = ["sample_denoised", "fast_sample"]


@torch.no_grad()
def sample_denoised(
    dist: TrajectoryDistribution,
    sample_shape: torch.Size | tuple[int, ...] = (),
    *,
    clip_percentile: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The full sampling path (NTM Algorithm 2 with step 4 = Algorithm 3).

    1-3. Run the predictor :math:`T` times and invert the transporter at **every** level below :math:`T`
       (``dist.rsample``: batched across levels after the chain, or level by level for a predictor that
       reads data space; the KV-cached token-by-token inverse for the transformer transporter).
    4. Denoise with the trajectory's score (:func:`trajectory_score_denoise`).

    ``generator`` (a :class:`torch.Generator` on the model's device) draws all the noise; ``None`` uses
    torch's global generator.

    Returns:
        :math:`\hat x_0`, shape ``(*sample_shape, *batch_shape, *data)``.
    """
    traj = dist.rsample(sample_shape, generator=generator)
    return trajectory_score_denoise(dist, traj, clip_percentile=clip_percentile)


@torch.no_grad()
def fast_sample(
    model: NTM,
    denoiser: LearnedDenoiser,
    sample_shape: torch.Size | tuple[int, ...] = (),
    *,
    cond: Condition | None = None,
    steps: int = 4,
    t_min: float = SAMPLE_T_MIN,
    shift: float = 1.0,
    grid: Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The fast sampling path (NTM Algorithm 2 with step 4 = the learned denoiser, §3.4).

    1-2. Run the predictor :math:`T` times in transporter space (with classifier-free guidance if
         ``guidance > 0``) to :math:`\hat u_{t_0}`.
    4. :math:`\hat x_0 = g_\phi(\hat u_{t_0}, t_0, y)` (conditional, no dropout). The transporter's inverse
       (step 3) is skipped entirely.

    Arguments:
        model: The NTM.
        denoiser: The learned denoiser (trained at the same ``t_min`` and ``steps``).
        sample_shape: Samples per condition, on the left of the condition's batch shape.
        cond, steps, t_min, shift, grid, guidance, temperature, generator: As in :meth:`trajflow.NTM.sample`.

    Returns:
        :math:`\hat x_0`, ``(*sample_shape, *batch_shape, *data)``.
    """
    if torch.Size(denoiser.event_shape) != model.event_shape:
        raise ValueError(
            f"denoiser: its event shape {tuple(denoiser.event_shape)} differs from the model's "
            f"{tuple(model.event_shape)}"
        )
    check_cond(denoiser, cond)
    if grid is None:
        grid = time_grid(steps, t_min, shift, device=model.device)
    dist = model.distribution(grid, cond, guidance=guidance, temperature=temperature)
    latents, _ = dist.rsample_latents(sample_shape, generator=generator)  # (*lead, T + 1, *data)
    dd = len(model.event_shape)
    level = latents.dim() - dd - 1
    lead = latents.shape[:level]
    u0 = latents.select(level, 0).reshape(-1, *model.event_shape)  # (N, *data)
    t0 = dist.grid[..., 0].expand(lead).reshape(-1)  # (N,)
    flat_cond = None
    if cond is not None:
        flat_cond = align_cond(cond, denoiser.cond_event_dims, lead)
    x0 = denoiser(u0.to(next(denoiser.parameters()).dtype), t0, flat_cond, None)
    return x0.reshape(*lead, *model.event_shape)
