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

Every density also knows its exact mass in each bin of a grid (:meth:`ToyDensity.bin_masses`), which
:func:`trajflow.metrics.histogram_distance` compares with a sample's histogram; ``checkerboard``, the only one
with a bounded support, says which points lie in it (:meth:`ToyDensity.in_support`).

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

from ..checks import check_edges, check_tensor
from ..metrics import histogram_2d

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


def _two_moons(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    moon = _randint(2, n, g, device)
    x = _moon_centres(moon, math.pi * _rand(n, g, device))
    return x + _MOON_STD * _randn(n, g, device, 2), moon


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


def _spirals(n: int, g: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    arm = _randint(2, n, g, device)
    x = _spiral_centres(arm, _rand(n, g, device))
    return x + _SPIRAL_STD * _randn(n, g, device, 2), arm


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


# --------------------------------------------------------------------------------------- exact bin masses
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


def _checkerboard_cdf(edges: Tensor) -> Tensor:
    corner = _dark_squares()
    cdf = ((edges[None, :, None] - corner[:, None, :]) / _CELL).clamp(0.0, 1.0)  # (8, B + 1, 2)
    return _product_cdf(cdf[..., 0], cdf[..., 1], torch.full((8,), 1 / 8, dtype=torch.float64))


def _gaussians_on_circle_cdf(edges: Tensor) -> Tensor:
    comp = torch.arange(_CIRCLE_K)
    weights = torch.full((_CIRCLE_K,), 1 / _CIRCLE_K, dtype=torch.float64)
    return _gaussian_mixture_cdf(_circle_centres(comp), weights, _CIRCLE_STD, edges)


def _two_moons_cdf(edges: Tensor) -> Tensor:
    moon = torch.arange(2).repeat_interleave(_NODES)
    t = math.pi * _midpoints(_NODES).repeat(2)
    weights = torch.full((2 * _NODES,), 1 / (2 * _NODES), dtype=torch.float64)
    return _gaussian_mixture_cdf(_moon_centres(moon, t), weights, _MOON_STD, edges)


def _spirals_cdf(edges: Tensor) -> Tensor:
    arm = torch.arange(2).repeat_interleave(_NODES)
    u = _midpoints(_NODES).repeat(2)
    weights = torch.full((2 * _NODES,), 1 / (2 * _NODES), dtype=torch.float64)
    return _gaussian_mixture_cdf(_spiral_centres(arm, u), weights, _SPIRAL_STD, edges)


def _rings_cdf(edges: Tensor) -> Tensor:
    # Along the ray at angle phi, the point r (cos phi, sin phi) is Gaussian in r (a negative r included).
    radius = _RING_STEP * (torch.arange(_RINGS, dtype=torch.float64) + 1.0).repeat_interleave(_NODES)
    phi = 2 * math.pi * _midpoints(_NODES).repeat(_RINGS)
    ray = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    weights = torch.full((_RINGS * _NODES,), 1 / (_RINGS * _NODES), dtype=torch.float64)
    return _line_gaussian_cdf(radius[:, None] * ray, ray, weights, _RING_STD, edges)


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


def _checkerboard_support(x: Tensor) -> Tensor:
    corner = _dark_squares().to(x)
    inside = (x[:, None, :] >= corner) & (x[:, None, :] <= corner + _CELL)  # closed squares, (n, 8, 2)
    return inside.all(dim=2).any(dim=1)


class ToyDensity:
    """A named 2-D density that can be sampled, optionally with integer class labels, and whose mass in the
    bins of a grid is known (:meth:`bin_masses`), for :func:`trajflow.metrics.histogram_distance`.

    Arguments:
        name: Registry name.
        sampler: ``(n, generator, device) -> (x (n, 2) float64, labels (n,) int64)``.
        num_classes: Number of classes for a class-conditional density, ``0`` for an unconditional one.
        description: One line for listings.
        cdf: ``edges (B + 1,) float64 -> F (B + 1, B + 1)`` with ``F[i, j] = P(X <= e_i, Y <= e_j)``: the
            exact CDF on a grid's corners, or ``None`` to estimate bin masses from samples.
        support: ``x (n, 2) -> (n,) bool``, whether each point lies in the density's support, for a density
            with a bounded support; ``None`` otherwise.

    Example:
        >>> import torch
        >>> d = TOY_DENSITIES["rings"]
        >>> d.sample(3, generator=torch.Generator().manual_seed(1)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        name: str,
        sampler: Sampler,
        num_classes: int = 0,
        description: str = "",
        *,
        cdf: Callable[[Tensor], Tensor] | None = None,
        support: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.name = name
        self._sampler = sampler
        self.num_classes = num_classes
        self.description = description
        self._cdf = cdf
        self._support = support

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

    @property
    def exact_bin_masses(self) -> bool:
        """Whether :meth:`bin_masses` is exact (from the density's CDF) rather than estimated from samples."""
        return self._cdf is not None

    def bin_masses(self, edges: Tensor) -> Tensor:
        """The probability of each bin of the square grid ``edges x edges``: ``(B, B)`` float64 on the CPU,
        ``[i, j]`` for ``x`` in bin ``i`` and ``y`` in bin ``j``, as :func:`trajflow.metrics.histogram_2d`
        counts samples. The mass outside the grid is ``1 - sum``.

        Every density of :data:`TOY_DENSITIES` has an exact CDF: the masses are closed-form for
        ``checkerboard``, ``eight_gaussians`` and ``class_mixture``, and a 1-D quadrature of closed-form
        Gaussian CDFs along the curve for the others (error below 5e-5 in total variation on a 0.25-wide
        grid; about 1 s for rings and pinwheel). A density built without ``cdf`` gets them from a histogram
        of 2^22 of its samples (fixed seed 0) instead: a Monte-Carlo estimate, whose own total-variation
        error is about ``sum_k sqrt(p_k / (2 pi 2^22))`` (0.004 for 400 equally occupied bins).

        Arguments:
            edges: ``(B + 1,)`` strictly ascending bin edges, the same for both coordinates.

        Example:
            >>> import torch
            >>> p = toy_density("checkerboard").bin_masses(torch.tensor([-3.0, 0.0, 3.0]))
            >>> p.tolist()  # each quadrant of the board holds 2 of the 8 dark squares
            [[0.25, 0.25], [0.25, 0.25]]
            >>> p = toy_density("spirals").bin_masses(torch.linspace(-4.5, 4.5, 37))
            >>> p.shape, round(float(p.sum()), 6)
            (torch.Size([36, 36]), 1.0)
        """
        edges = check_edges("edges", edges)
        if self._cdf is None:
            return self._sampled_bin_masses(edges)
        cdf = self._cdf(edges)
        masses = cdf[1:, 1:] - cdf[:-1, 1:] - cdf[1:, :-1] + cdf[:-1, :-1]
        return masses.clamp(min=0.0)  # differences of CDF values can round a hair below 0

    def _sampled_bin_masses(self, edges: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        chunk, chunks = 1 << 20, 4
        return sum(histogram_2d(self.sample(chunk, generator=generator), edges) for _ in range(chunks)) / chunks

    @property
    def bounded_support(self) -> bool:
        """Whether the density has a bounded support that :meth:`in_support` tests (``checkerboard``)."""
        return self._support is not None

    def in_support(self, x: Tensor) -> Tensor:
        """Whether each point of ``x`` ``(n, 2)`` lies in the (closed) support: ``(n,)`` bool.

        Raises ValueError for a density without a bounded support (:attr:`bounded_support` is False): with
        Gaussian noise, every point is in the support.

        Example:
            >>> import torch
            >>> toy_density("checkerboard").in_support(torch.tensor([[-2.0, -2.0], [-0.5, -2.0]])).tolist()
            [True, False]
        """
        if self._support is None:
            bounded = sorted(k for k, d in TOY_DENSITIES.items() if d.bounded_support)
            raise ValueError(
                f"toy density {self.name!r} has no bounded support (every point has positive density); "
                f"densities with one: {bounded}"
            )
        check_tensor("x", x)
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"x: expected a tensor of shape (n, 2), got shape {tuple(x.shape)}")
        return self._support(x.detach().to(torch.float64))

    def __repr__(self) -> str:
        return f"ToyDensity(name={self.name!r}, num_classes={self.num_classes})"


TOY_DENSITIES: dict[str, ToyDensity] = {
    d.name: d
    for d in [
        ToyDensity(
            "eight_gaussians",
            _gaussians_on_circle,
            0,
            "8 Gaussians (std 0.2) on a circle of radius 2.5",
            cdf=_gaussians_on_circle_cdf,
        ),
        ToyDensity("two_moons", _two_moons, 0, "two interleaved half circles", cdf=_two_moons_cdf),
        ToyDensity(
            "checkerboard",
            _checkerboard,
            0,
            "8 uniform squares of a 4x4 board on [-3, 3]^2",
            cdf=_checkerboard_cdf,
            support=_checkerboard_support,
        ),
        ToyDensity("spirals", _spirals, 0, "two interleaved spirals", cdf=_spirals_cdf),
        ToyDensity("pinwheel", _pinwheel, 0, "5 curved arms", cdf=_pinwheel_cdf),
        ToyDensity("rings", _rings, 0, "4 concentric circles", cdf=_rings_cdf),
        ToyDensity(
            "class_mixture",
            _gaussians_on_circle,
            8,
            "eight_gaussians labelled by component",
            cdf=_gaussians_on_circle_cdf,
        ),
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
