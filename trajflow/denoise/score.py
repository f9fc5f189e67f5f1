r"""Trajectory score denoising (NTM Eq. 3.5, Algorithm 3): the covariance-weighted Tweedie step (see
:mod:`trajflow.denoise`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_event_shape, check_finite
from ..distribution import TrajectoryDistribution
from ..process import MarkovInterpolant

__all__ = ["trajectory_score_denoise"]


def _conditional(dist: TrajectoryDistribution) -> TrajectoryDistribution:
    """The same distribution without guidance or temperature (the conditional model, its own scale), for the
    score: Tweedie's step wants the model of the data, not the tempered or guided one a sampler drew from."""
    if dist.guidance == 0 and dist.temperature == 1.0:
        return dist
    return TrajectoryDistribution(
        dist.transporter, dist.predictor, dist.grid, dist.cond, drop_cond=dist.drop_cond, validate_args=False
    )


def _clip_percentile(g: Tensor, percentile: float, level: int) -> Tensor:
    """Clip ``g`` ``(*lead, T + 1, *data)`` elementwise at the ``percentile``-th percentile of ``|g|`` per
    trajectory."""
    flat = g.abs().flatten(level)  # (*lead, (T + 1) D)
    k = max(1, min(flat.shape[-1], math.ceil(percentile / 100.0 * flat.shape[-1])))
    q = flat.kthvalue(k, dim=-1).values  # (*lead,)
    q = q.reshape(*q.shape, *([1] * (g.dim() - level)))
    return torch.maximum(torch.minimum(g, q), -q)


def trajectory_score_denoise(
    dist: TrajectoryDistribution,
    traj: Tensor,
    *,
    clip_percentile: float | None = None,
    return_trajectory: bool = False,
) -> Tensor:
    r"""Denoise a trajectory with its own exact score (NTM Eq. 3.5, Algorithm 3).

    1. Enable gradients on the trajectory :math:`\hat x` (every level, in data space).
    2. :math:`g = \nabla_{\hat x} (-\log p(\hat x))` by autograd through the NTM's NLL; optionally clip
       :math:`g` elementwise at the ``clip_percentile``-th percentile of :math:`|g|` of each trajectory.
    3. :math:`\hat x^{den}_i = (\hat x_i - \sum_j S_{ij} g_j) / (1 - t_i)` per level :math:`i < T`, with
       :math:`S` = :meth:`~trajflow.MarkovInterpolant.covariance` of the grid (mixing levels, per element).

    With guidance or a temperature the score is the untempered conditional model's. The parameters get no
    ``.grad``. At :math:`t_0 = 0` nothing changes (row 0 of :math:`S` vanishes).

    Arguments:
        dist: The NTM's trajectory distribution (grid, condition).
        traj: Trajectories in data space, ``(*lead, T + 1, *data)``, e.g. ``dist.decode(latents)``.
        clip_percentile: Percentile in (0, 100] for clipping the gradient, or ``None``.
        return_trajectory: Also return the estimate of every level ``i < T``.

    Returns:
        :math:`\hat x_0` of shape ``(*lead, *data)``, detached; with ``return_trajectory``, the estimates of
        all levels below :math:`T`, ``(*lead, T, *data)`` (index 0 is the same :math:`\hat x_0`).
    """
    check_event_shape("traj", traj, dist.event_shape, "(T + 1, *data)")
    check_finite("traj", traj)
    if clip_percentile is not None and not 0 < clip_percentile <= 100:
        raise ValueError(f"clip_percentile: expected a percentile in (0, 100] or None, got {clip_percentile!r}")
    dd = len(dist.data_shape)
    level = traj.dim() - dd - 1
    T = dist.steps
    cdist = _conditional(dist)
    with torch.enable_grad():
        x = traj.detach().requires_grad_(True)
        nll = -cdist.log_prob(x).sum()  # examples are independent: the sum's gradient is per example
        (g,) = torch.autograd.grad(nll, x)  # (*lead, T + 1, *data)
    if clip_percentile is not None:
        g = _clip_percentile(g, clip_percentile, level)
    grid = dist.grid.to(traj.device)
    S = MarkovInterpolant.covariance(grid).to(g.dtype)  # (*gb, T + 1, T + 1)
    lead = traj.shape[:level]
    sg = (S @ g.flatten(level + 1)).reshape(g.shape)  # (*lead, T + 1, *data): (S g)_i = sum_j S_ij g_j
    t = grid[..., :T].to(g.dtype)  # (*gb, T)
    t = t.reshape(*t.shape, *([1] * dd))
    x_den = (traj.detach().narrow(level, 0, T) - sg.narrow(level, 0, T)) / (1 - t)  # (*lead, T, *data)
    x_den = x_den.expand(*lead, T, *dist.data_shape)
    if return_trajectory:
        return x_den
    return x_den.select(level, 0)
