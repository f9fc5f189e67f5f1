r"""Classifier-free guidance for Gaussian steps, with the clipped precision rule.

Given a conditional Gaussian :math:`\mathcal{N}(\mu_c, \sigma_c^2)` and an unconditional one
:math:`\mathcal{N}(\mu_u, \sigma_u^2)` (per dimension), the guided step is the Gaussian whose
log-density is :math:`(1 + w) \log p_c - w \log p_u` up to normalisation, with the variance ratio
clipped so that guidance can only sharpen:

.. math:: r = \mathrm{clip}(\sigma_c^2 / \sigma_u^2, 0, 1), \quad
          \sigma = \frac{\sigma_c}{\sqrt{1 + w - w r}}, \quad
          \mu = \frac{(1 + w) \mu_c - w r \mu_u}{1 + w - w r},

ordinary classifier-free guidance on the mean when :math:`\sigma_c = \sigma_u`.

References:
    | STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis (Gu et al., 2025),
    | Proposition 2. https://arxiv.org/abs/2506.06276
    | Normalizing Trajectory Models (Gu et al., 2026), App. C.5. https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

from torch import Tensor

from .checks import check_number

__all__ = ["guided_gaussian"]


def guided_gaussian(
    mu_c: Tensor, sigma_c: Tensor, mu_u: Tensor, sigma_u: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    r"""The clipped Gaussian classifier-free guidance rule; returns ``(mu, sigma)``.

    Arguments:
        mu_c, sigma_c: Conditional mean and scale.
        mu_u, sigma_u: Unconditional mean and scale, same shape.
        weight: The guidance weight :math:`w \geq 0`; 0 returns the conditional Gaussian.

    Example:
        >>> import torch
        >>> mu, sigma = guided_gaussian(torch.ones(2), torch.ones(2), torch.zeros(2), torch.ones(2), 2.0)
        >>> mu, sigma
        (tensor([3., 3.]), tensor([1., 1.]))
    """
    check_number("weight", weight, low=0)
    ratio = (sigma_c / sigma_u).square().clamp(0.0, 1.0)
    denom = 1 + weight - weight * ratio  # >= 1, so the guided precision is at least 1 / sigma_c^2
    mu = ((1 + weight) * mu_c - weight * ratio * mu_u) / denom
    return mu, sigma_c / denom.sqrt()
