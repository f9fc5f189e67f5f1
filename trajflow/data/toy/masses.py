"""Exact bin masses of the toy densities, from their closed-form 2-D CDFs (see the comment of ``_NODES``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .samplers import (
    _ARMS,
    _CELL,
    _CIRCLE_K,
    _CIRCLE_STD,
    _MOON_STD,
    _RADIAL_STD,
    _RING_STD,
    _RING_STEP,
    _RINGS,
    _SPIRAL_STD,
    _TANGENTIAL_STD,
    _circle_centres,
    _dark_squares,
    _moon_centres,
    _pinwheel_angle,
    _spiral_centres,
)

__all__ = []


# A density's bin masses are the inclusion-exclusion of its 2-D CDF F(a, b) = P(X <= a, Y <= b) on the grid's
# corners. Every density here is a mixture, over a curve parameter, of laws whose CDF is closed-form: a
# uniform square (checkerboard), an isotropic Gaussian (eight_gaussians, two_moons, spirals) or a Gaussian
# on a line (rings: radial noise along a ray; pinwheel: tangential noise across an arm). The mixture is a
# finite sum for checkerboard and eight_gaussians (exact) and a midpoint rule on _NODES nodes per curve
# otherwise; against 4x the nodes, on the toy job's grid (bins 0.25 wide on [-4.5, 4.5]^2), the masses move
# by less than 5e-5 in total variation (rings 3e-5, pinwheel 3e-5, spirals 1e-6, two_moons 2e-7), far below
# the sampling floor of even 10^6 samples (0.01). Cost: about 1 s for rings and pinwheel on one CPU core,
# growing with the number of grid corners.
_NODES = 4096


def _std_normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))  # erfc keeps the lower tail accurate


def _midpoints(n: int) -> Tensor:
    """The midpoint rule's nodes on ``[0, 1]``: ``(k + 1/2) / n``, float64."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _product_cdf(cdf_x: Tensor, cdf_y: Tensor, weights: Tensor) -> Tensor:
    """``F[i, j] = sum_n w_n Fx_n(e_i) Fy_n(e_j)`` for a mixture of laws with independent coordinates."""
    return (cdf_x * weights[:, None]).T @ cdf_y


def _gaussian_mixture_cdf(centres: Tensor, weights: Tensor, std: float, edges: Tensor) -> Tensor:
    """``F`` on the corners ``edges x edges`` of ``sum_n w_n N(centres_n, std^2 I)``."""
    cdf = _std_normal_cdf((edges[None, :, None] - centres[:, None, :]) / std)  # (N, B + 1, 2)
    return _product_cdf(cdf[..., 0], cdf[..., 1], weights)


def _half_line(c: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``{t : t v <= c}`` (elementwise) as the interval ``[lo, hi]``, possibly infinite or empty (lo > hi)."""
    ratio = c / torch.where(v == 0, 1.0, v)
    inf = torch.full_like(ratio, math.inf)
    lo = torch.where(v < 0, ratio, torch.where((v == 0) & (c < 0), inf, -inf))
    hi = torch.where(v > 0, ratio, inf)
    return lo, hi


def _line_gaussian_cdf(points: Tensor, directions: Tensor, weights: Tensor, std: float, edges: Tensor) -> Tensor:
    """``F`` on the corners of ``sum_n w_n law(points_n + std Z directions_n)``, ``Z`` standard normal: each
    term is a Gaussian on a line, and ``{X <= a, Y <= b}`` is an interval of ``Z``."""
    corners = edges.shape[0]
    out = edges.new_zeros(corners, corners)
    chunk = max(1, (1 << 21) // corners**2)
    for start in range(0, points.shape[0], chunk):
        p, v, w = points[start : start + chunk], directions[start : start + chunk], weights[start : start + chunk]
        lo_x, hi_x = _half_line(edges[None, :] - p[:, :1], v[:, :1])  # (N, B + 1), in units of std Z
        lo_y, hi_y = _half_line(edges[None, :] - p[:, 1:], v[:, 1:])
        lo = torch.maximum(lo_x[:, :, None], lo_y[:, None, :]) / std
        hi = torch.minimum(hi_x[:, :, None], hi_y[:, None, :]) / std
        mass = (_std_normal_cdf(hi) - _std_normal_cdf(lo)).clamp(min=0.0)
        out += torch.einsum("n,nij->ij", w, mass)
    return out


def _uniform(n: int) -> Tensor:
    """Equal mixture weights ``(n,)``, float64."""
    return torch.full((n,), 1 / n, dtype=torch.float64)


def _checkerboard_cdf(edges: Tensor) -> Tensor:
    corner = _dark_squares()
    cdf = ((edges[None, :, None] - corner[:, None, :]) / _CELL).clamp(0.0, 1.0)  # (8, B + 1, 2)
    return _product_cdf(cdf[..., 0], cdf[..., 1], _uniform(8))


def _gaussians_on_circle_cdf(edges: Tensor) -> Tensor:
    return _gaussian_mixture_cdf(_circle_centres(torch.arange(_CIRCLE_K)), _uniform(_CIRCLE_K), _CIRCLE_STD, edges)


def _two_curves_cdf(centres: Callable[[Tensor, Tensor], Tensor], span: float, std: float, edges: Tensor) -> Tensor:
    """``F`` of two equally weighted curves ``centres(curve, u)`` (``u`` uniform on ``[0, span]``) blurred by
    isotropic Gaussians of ``std``: the midpoint rule on ``_NODES`` nodes per curve."""
    curve = torch.arange(2).repeat_interleave(_NODES)
    u = span * _midpoints(_NODES).repeat(2)
    return _gaussian_mixture_cdf(centres(curve, u), _uniform(2 * _NODES), std, edges)


def _two_moons_cdf(edges: Tensor) -> Tensor:
    return _two_curves_cdf(_moon_centres, math.pi, _MOON_STD, edges)


def _spirals_cdf(edges: Tensor) -> Tensor:
    return _two_curves_cdf(_spiral_centres, 1.0, _SPIRAL_STD, edges)


def _rings_cdf(edges: Tensor) -> Tensor:
    # Along the ray at angle phi, the point r (cos phi, sin phi) is Gaussian in r (a negative r included).
    radius = _RING_STEP * (torch.arange(_RINGS, dtype=torch.float64) + 1.0).repeat_interleave(_NODES)
    phi = 2 * math.pi * _midpoints(_NODES).repeat(_RINGS)
    ray = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    return _line_gaussian_cdf(radius[:, None] * ray, ray, _uniform(_RINGS * _NODES), _RING_STD, edges)


def _pinwheel_cdf(edges: Tensor) -> Tensor:
    # Given the radial z_0, the arm's point 2 R(angle) (z_0, z_1) is Gaussian along the rotated second axis,
    # with std 2 * _TANGENTIAL_STD. z_0 = 1 + _RADIAL_STD a: a midpoint rule on a in [-8, 8], normal weights.
    a = 16.0 * _midpoints(_NODES) - 8.0
    weights = torch.exp(-0.5 * a**2)
    weights = (weights / (weights.sum() * _ARMS)).repeat(_ARMS)
    arm = torch.arange(_ARMS).repeat_interleave(a.shape[0])
    radial = (1.0 + _RADIAL_STD * a).repeat(_ARMS)
    angle = _pinwheel_angle(arm, radial)
    c, s = torch.cos(angle), torch.sin(angle)
    points = 2.0 * radial[:, None] * torch.stack([c, s], dim=1)
    return _line_gaussian_cdf(points, torch.stack([-s, c], dim=1), weights, 2.0 * _TANGENTIAL_STD, edges)
