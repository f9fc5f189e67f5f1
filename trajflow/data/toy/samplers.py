"""The toy densities' samplers: each draws ``n`` points ``(n, 2)`` and their component or class index."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = []


# A sampler draws ``n`` points and their component / class index: ``(n, 2) float64, (n,) int64``.
# Unconditional densities also return an index (which arm, ring, ...) that is simply not exposed.
Sampler = Callable[[int, "torch.Generator | None", torch.device], "tuple[Tensor, Tensor]"]


def _randn(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g, device=device, dtype=torch.float64)


def _rand(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, device=device, dtype=torch.float64)


def _randint(high: int, n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, (n,), generator=g, device=device, dtype=torch.int64)


# eight_gaussians: _CIRCLE_K Gaussians of std _CIRCLE_STD on a circle of radius _CIRCLE_RADIUS.
_CIRCLE_K, _CIRCLE_RADIUS, _CIRCLE_STD = 8, 2.5, 0.2


def _circle_centres(comp: Tensor) -> Tensor:
    """Centres ``(n, 2)`` of the Gaussians ``comp`` ``(n,)`` of ``eight_gaussians``."""
    angle = comp.to(torch.float64) * (2 * math.pi / _CIRCLE_K)
    return _CIRCLE_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def _gaussians_on_circle(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    comp = _randint(_CIRCLE_K, n, g, device)
    return _circle_centres(comp) + _CIRCLE_STD * _randn(n, g, device, 2), comp


_MOON_STD = 0.2


def _moon_centres(moon: Tensor, t: Tensor) -> Tensor:
    """Points ``(n, 2)`` at angle ``t`` in ``[0, pi]`` of the moons ``moon`` (0 upper, 1 lower) of ``two_moons``."""
    # Upper moon: half circle around (0, 0); lower moon: the same flipped and shifted by (1, -0.5), as in
    # the classic two-moons layout. Centre on the bounding box mid-point, then scale by 2 so that the
    # moons span about [-3, 3] x [-1.5, 1.5].
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(moon[:, None] == 0, upper, lower)
    return 2.0 * (x - x.new_tensor([0.5, 0.25]))


def _blurred_curves(
    centres: Callable[[Tensor, Tensor], Tensor],
    span: float,
    std: float,
    n: int,
    g: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Two equally likely curves ``centres(curve, u)``, ``u`` uniform on ``[0, span]``, with Gaussian noise."""
    curve = _randint(2, n, g, device)
    x = centres(curve, span * _rand(n, g, device))
    return x + std * _randn(n, g, device, 2), curve


_two_moons: Sampler = functools.partial(_blurred_curves, _moon_centres, math.pi, _MOON_STD)


# The checkerboard: a 4x4 board of cells _CELL wide from _LOW on, of which the 8 cells whose (column + row)
# is even carry the mass.
_CELL, _LOW = 1.5, -3.0


def _checkerboard(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    col = _randint(4, n, g, device)
    row = 2 * _randint(2, n, g, device) + (col % 2)  # row parity follows column parity
    u = _rand(n, g, device, 2)
    x = torch.stack([col, row], dim=1).to(torch.float64) + u
    return _CELL * x + _LOW, col * 4 + row


def _dark_squares() -> Tensor:
    """Lower-left corners ``(8, 2)`` of the checkerboard's dark squares, in data units."""
    cells = torch.tensor([(c, r) for c in range(4) for r in range(4) if (c + r) % 2 == 0], dtype=torch.float64)
    return _CELL * cells + _LOW


_SPIRAL_STD = 0.1


def _spiral_centres(arm: Tensor, u: Tensor) -> Tensor:
    """Points ``(n, 2)`` of the arms ``arm`` of ``spirals`` at the uniform ``u`` in ``[0, 1)``."""
    # theta = sqrt(u) * 3 pi spreads points evenly along the arc length of an Archimedean spiral
    # (arc length grows like theta^2); the second arm is the first rotated by pi.
    theta = u.sqrt() * (3 * math.pi)
    r = theta / (3 * math.pi) * 3.5
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return torch.where(arm[:, None] == 0, x, -x)


_spirals: Sampler = functools.partial(_blurred_curves, _spiral_centres, 1.0, _SPIRAL_STD)


# pinwheel: arm k is z = (1 + _RADIAL_STD a, _TANGENTIAL_STD b) (a, b standard normal) rotated by
# _pinwheel_angle(k, z_0), scaled by 2.
_ARMS, _RADIAL_STD, _TANGENTIAL_STD = 5, 0.3, 0.05


def _pinwheel_angle(arm: Tensor, radial: Tensor) -> Tensor:
    """Rotation of the arm ``arm`` at the radial coordinate ``radial`` (``z_0``) of ``pinwheel``."""
    # Each arm is an elongated Gaussian along the x-axis, rotated by its base angle plus a twist that grows
    # exponentially with the radial coordinate, which bends the arms into a pinwheel.
    return arm.to(torch.float64) * (2 * math.pi / _ARMS) + 0.25 * torch.exp(radial)


def _pinwheel(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    arm = _randint(_ARMS, n, g, device)
    z = _randn(n, g, device, 2) * torch.tensor([_RADIAL_STD, _TANGENTIAL_STD], dtype=torch.float64, device=device)
    z[:, 0] += 1.0
    angle = _pinwheel_angle(arm, z[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack([c * z[:, 0] - s * z[:, 1], s * z[:, 0] + c * z[:, 1]], dim=1)
    return 2.0 * x, arm


# rings: _RINGS circles of radius _RING_STEP * (k + 1), equal mass, uniform angle, radial noise _RING_STD.
_RINGS, _RING_STEP, _RING_STD = 4, 0.75, 0.08


def _rings(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    ring = _randint(_RINGS, n, g, device)
    radius = _RING_STEP * (ring.to(torch.float64) + 1.0)
    angle = 2 * math.pi * _rand(n, g, device)
    r = radius + _RING_STD * _randn(n, g, device)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1), ring
