r"""What a few-step sampler has decided at each step: the clean-image estimate after every level.

To tell *where* in a 4-step trajectory a prompt's layout, shapes and colours go wrong, read the sampler's
running estimate of the clean image at each step and score it like a final sample:

* flow matching (Euler): before the step from :math:`t` the estimate is :math:`\hat x_0 = x_t - t\,v(x_t, t)`
  (the marginals are :math:`x_t = (1 - t) x_0 + t \varepsilon`);
* NTM: the predictor gives the Gaussian :math:`(\mu_P, \sigma_P)` of :math:`u_s` given :math:`u_t`. For the
  forward process the posterior mean is :math:`A u_t + B\,\mathbb{E}[x_0 | x_t]`
  (:meth:`~trajflow.MarkovInterpolant.posterior`), so :math:`\hat u_0 = (\mu_P - A u_t) / B` is the clean
  estimate the step implies, read in transporter space and decoded with the transporter's inverse at
  :math:`s`. With an identity transporter this is exact; with a learned one it is the natural reading of
  the step, not an identity.

Level ``T`` in the output is the first step (from noise), level 1 the last; the last level's NTM estimate
is the mean of the final step, not the sample itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trajflow.conditioning import Condition
from trajflow.process import SAMPLE_T_MIN, MarkovInterpolant, time_grid
from trajflow.velocity import guided_velocity

__all__ = ["ntm_level_estimates", "euler_level_estimates"]


@torch.no_grad()
def ntm_level_estimates(
    model,
    noise: Tensor,
    *,
    cond: Condition | None = None,
    steps: int = 4,
    t_min: float = SAMPLE_T_MIN,
    shift: float = 1.0,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Clean-image estimates of an NTM's guided sampling chain, ``(steps, N, *data)``; row ``i`` is the step
    from level ``steps - i`` (row 0: the first step, from noise).

    Arguments:
        model: An :class:`~trajflow.NTM`.
        noise: :math:`x_{t_T} \sim \mathcal{N}(0, I)`, ``(N, *data)``.
        cond: Flat condition with batch ``N`` (or ``None``).
        steps, t_min, shift: The sampling grid (:func:`~trajflow.time_grid`; ``t_min`` as in
            :meth:`trajflow.NTM.sample`).
        guidance: Classifier-free guidance weight (the clipped Gaussian rule).
        generator: Draws of the chain's step noise.
    """
    if noise.dim() != len(model.event_shape) + 1 or noise.shape[1:] != model.event_shape:
        raise ValueError(
            f"noise: expected shape (N, {', '.join(map(str, model.event_shape))}), got {tuple(noise.shape)}"
        )
    grid = time_grid(steps, t_min, shift, device=noise.device)
    dist = model.distribution(grid, cond, guidance=guidance, validate_args=False)
    n = noise.shape[0]
    times = grid.expand(n, steps + 1)
    u, out = noise, []
    for k in range(steps, 0, -1):
        t, s = times[:, k], times[:, k - 1]
        mu, sigma = dist._predict(u, t, s, inner=0)
        A, B, _ = MarkovInterpolant.posterior(t, s)
        shape = (n,) + (1,) * (u.dim() - 1)
        u0 = (mu - A.reshape(shape).to(mu) * u) / B.reshape(shape).to(mu)
        out.append(dist._inverse(u0.to(noise.dtype), s))
        z = torch.randn(sigma.shape, generator=generator, device=sigma.device, dtype=sigma.dtype)
        u = (mu + sigma * z).to(noise.dtype)
    return torch.stack(out)


@torch.no_grad()
def euler_level_estimates(
    model,
    noise: Tensor,
    *,
    cond: Condition | None = None,
    steps: int = 4,
    shift: float = 1.0,
    guidance: float = 0.0,
) -> Tensor:
    r"""Clean-image estimates :math:`x_t - t\,v` before each Euler step of flow matching, ``(steps, N, *data)``
    (row 0: at :math:`t = 1`), on the grid of :func:`~trajflow.baselines.flow_matching.euler_sample`."""
    ts = time_grid(steps, 0.0, shift, device=noise.device).flip(0)
    x, out = noise, []
    for t, s in zip(ts[:-1], ts[1:]):
        v = guided_velocity(model, x, t.expand(x.shape[0]), cond, guidance)
        out.append(x - t * v)
        x = x + (s - t) * v
    return torch.stack(out)
