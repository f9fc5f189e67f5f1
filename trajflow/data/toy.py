"""Toy 2-D densities for quick CPU experiments and plots.

Every density is scaled so that its samples lie roughly inside ``[-4, 4]^2`` with a per-coordinate
standard deviation between about 1 and 2 (measured std per coordinate below, 1M samples), so one set of
model and sampler settings works across all of them and a standard normal prior is of the same scale:

- ``eight_gaussians``: 8 isotropic Gaussians (std 0.2) on a circle of radius 2.5; std 1.78, 1.78.
- ``two_moons``: two interleaved half circles (radius 2, noise std 0.2); std 1.74, 1.01.
- ``checkerboard``: uniform on the 8 dark squares of a 4x4 board on ``[-3, 3]^2``; std 1.73, 1.73.
- ``spirals``: two interleaved spirals, 1.5 turns, radius up to 3.5, noise std 0.1; std 1.78, 1.72.
- ``pinwheel``: 5 curved arms of radius about 2 (rare tails past 4); std 1.48, 1.48.
- ``rings``: 4 equally weighted circles of radius 0.75, 1.5, 2.25, 3 (noise std 0.08); std 1.45, 1.45.
- ``class_mixture``: ``eight_gaussians`` with the component index (``0..7``, counter-clockwise from
  angle 0) as the class label; ``num_classes = 8``. The only conditional one.

All means are 0 up to sampling noise.

All samplers are vectorised (100k samples take about 20 ms on one CPU core) and deterministic given a
:class:`torch.Generator`: every random draw goes through the generator, in a fixed order.

Example:
    >>> import torch
    >>> from trajflow.data.toy import toy_density
    >>> g = torch.Generator().manual_seed(0)
    >>> x = toy_density("two_moons").sample(1000, generator=g)
    >>> x.shape, x.dtype
    (torch.Size([1000, 2]), torch.float32)
    >>> x, y = toy_density("class_mixture").sample_labeled(5, generator=g)
    >>> y.dtype, bool(((0 <= y) & (y < 8)).all())
    (torch.int64, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ToyDensity", "TOY_DENSITIES", "toy_density"]

# A sampler draws ``n`` points and their component / class index: ``(n, 2) float64, (n,) int64``.
# Unconditional densities also return an index (which arm, ring, ...) that is simply not exposed.
Sampler = Callable[[int, "torch.Generator | None", torch.device], "tuple[Tensor, Tensor]"]


def _randn(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g, device=device, dtype=torch.float64)


def _rand(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, device=device, dtype=torch.float64)


def _randint(high: int, n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, (n,), generator=g, device=device, dtype=torch.int64)


def _gaussians_on_circle(
    n: int,
    g: torch.Generator | None,
    device: torch.device,
    *,
    k: int = 8,
    radius: float = 2.5,
    std: float = 0.2,
) -> tuple[Tensor, Tensor]:
    comp = _randint(k, n, g, device)
    angle = comp.to(torch.float64) * (2 * math.pi / k)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * _randn(n, g, device, 2), comp


def _two_moons(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    # Upper moon: half circle around (0, 0); lower moon: the same flipped and shifted by (1, -0.5), as in
    # the classic two-moons layout. Centre on the bounding box mid-point, then scale by 2 so that the
    # moons span about [-3, 3] x [-1.5, 1.5].
    moon = _randint(2, n, g, device)
    t = math.pi * _rand(n, g, device)
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(moon[:, None] == 0, upper, lower)
    x = 2.0 * (x - x.new_tensor([0.5, 0.25]))
    return x + 0.2 * _randn(n, g, device, 2), moon


def _checkerboard(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    # A 4x4 board of cells 1.5 wide on [-3, 3]^2; keep the 8 cells whose (column + row) is even.
    col = _randint(4, n, g, device)
    row = 2 * _randint(2, n, g, device) + (col % 2)  # row parity follows column parity
    u = _rand(n, g, device, 2)
    x = torch.stack([col, row], dim=1).to(torch.float64) + u
    return 1.5 * x - 3.0, col * 4 + row


def _spirals(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    # theta = sqrt(u) * 3 pi spreads points evenly along the arc length of an Archimedean spiral
    # (arc length grows like theta^2); the second arm is the first rotated by pi.
    arm = _randint(2, n, g, device)
    theta = _rand(n, g, device).sqrt() * (3 * math.pi)
    r = theta / (3 * math.pi) * 3.5
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    x = torch.where(arm[:, None] == 0, x, -x)
    return x + 0.1 * _randn(n, g, device, 2), arm


def _pinwheel(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    # Each arm is an elongated Gaussian along the x-axis, rotated by its base angle plus a twist that grows
    # exponentially with the radial coordinate, which bends the arms into a pinwheel.
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.05, 0.25
    arm = _randint(arms, n, g, device)
    z = _randn(n, g, device, 2) * torch.tensor([radial_std, tangential_std], dtype=torch.float64, device=device)
    z[:, 0] += 1.0
    angle = arm.to(torch.float64) * (2 * math.pi / arms) + rate * torch.exp(z[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack([c * z[:, 0] - s * z[:, 1], s * z[:, 0] + c * z[:, 1]], dim=1)
    return 2.0 * x, arm


def _rings(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    # Equal mass per ring, uniform angle, radial noise std 0.08.
    ring = _randint(4, n, g, device)
    radius = 0.75 * (ring.to(torch.float64) + 1.0)
    angle = 2 * math.pi * _rand(n, g, device)
    r = radius + 0.08 * _randn(n, g, device)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1), ring


class ToyDensity:
    """A named 2-D density that can be sampled, optionally with integer class labels.

    Arguments:
        name: Registry name.
        sampler: ``(n, generator, device) -> (x (n, 2) float64, labels (n,) int64)``.
        num_classes: Number of classes for a class-conditional density, ``0`` for an unconditional one.
        description: One line for listings.

    Example:
        >>> import torch
        >>> d = TOY_DENSITIES["rings"]
        >>> d.sample(3, generator=torch.Generator().manual_seed(1)).shape
        torch.Size([3, 2])
    """

    def __init__(self, name: str, sampler: Sampler, num_classes: int = 0, description: str = "") -> None:
        self.name = name
        self._sampler = sampler
        self.num_classes = num_classes
        self.description = description

    @property
    def conditional(self) -> bool:
        """Whether samples come with class labels (``num_classes > 0``)."""
        return self.num_classes > 0

    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative integer number of samples, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        # Draw on the generator's device so that a CUDA generator works too; compute in float64 so that the
        # result does not depend on float32 rounding of intermediate trigonometry.
        device = generator.device if generator is not None else torch.device("cpu")
        x, labels = self._sampler(n, generator, device)
        return x.to(torch.float32), labels

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, a float32 tensor of shape ``(n, 2)`` (on the generator's device, else CPU)."""
        return self._draw(n, generator)[0]

    def sample_labeled(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and their labels: ``(n, 2)`` float32 and ``(n,)`` int64 in ``0..num_classes-1``.

        Raises ValueError for an unconditional density (``num_classes == 0``).
        """
        if not self.conditional:
            labeled = sorted(k for k, d in TOY_DENSITIES.items() if d.conditional)
            raise ValueError(
                f"toy density {self.name!r} is unconditional (num_classes=0) and has no labels; "
                f"labeled densities: {labeled}"
            )
        return self._draw(n, generator)

    def __repr__(self) -> str:
        return f"ToyDensity(name={self.name!r}, num_classes={self.num_classes})"


TOY_DENSITIES: dict[str, ToyDensity] = {
    d.name: d
    for d in [
        ToyDensity("eight_gaussians", _gaussians_on_circle, 0, "8 Gaussians (std 0.2) on a circle of radius 2.5"),
        ToyDensity("two_moons", _two_moons, 0, "two interleaved half circles"),
        ToyDensity("checkerboard", _checkerboard, 0, "8 uniform squares of a 4x4 board on [-3, 3]^2"),
        ToyDensity("spirals", _spirals, 0, "two interleaved spirals"),
        ToyDensity("pinwheel", _pinwheel, 0, "5 curved arms"),
        ToyDensity("rings", _rings, 0, "4 concentric circles"),
        ToyDensity("class_mixture", _gaussians_on_circle, 8, "eight_gaussians labelled by component"),
    ]
}
"""All toy densities by name."""


def toy_density(name: str) -> ToyDensity:
    """Look up a toy density by name; raises ValueError listing the valid names.

    Example:
        >>> toy_density("spirals").num_classes
        0
    """
    try:
        return TOY_DENSITIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown toy density {name!r}; valid names: {sorted(TOY_DENSITIES)}") from None
