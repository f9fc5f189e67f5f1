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

All means are 0. The samplers are vectorised (100k samples in about 20 ms on one CPU core) and deterministic
given a :class:`torch.Generator`. Every density knows its exact mass in each bin of a grid
(:meth:`ToyDensity.bin_masses`, for :func:`trajflow.metrics.histogram_distance`); ``checkerboard``, the only one
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

from collections.abc import Callable

import torch
from torch import Tensor

from ...checks import check_count, check_edges, check_tensor
from ...metrics import histogram_2d
from .masses import _checkerboard_cdf, _gaussians_on_circle_cdf, _pinwheel_cdf, _rings_cdf, _spirals_cdf, _two_moons_cdf
from .samplers import (
    _CELL,
    Sampler,
    _checkerboard,
    _dark_squares,
    _gaussians_on_circle,
    _pinwheel,
    _rings,
    _spirals,
    _two_moons,
)

__all__ = ["ToyDensity", "TOY_DENSITIES", "toy_density"]


def _checkerboard_support(x: Tensor) -> Tensor:
    corner = _dark_squares().to(x)
    inside = (x[:, None, :] >= corner) & (x[:, None, :] <= corner + _CELL)  # closed squares, (n, 8, 2)
    return inside.all(dim=2).any(dim=1)


class ToyDensity:
    """A named 2-D density that can be sampled, optionally with integer class labels, with known bin masses.

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
        check_count("n", n, low=0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        # Drawn on the generator's device (a CUDA generator works too), in float64 so that the result does not
        # depend on float32 rounding of intermediate trigonometry.
        x, labels = self._sampler(n, generator, generator.device if generator is not None else torch.device("cpu"))
        return x.to(torch.float32), labels

    def _refuse(self, what: str, having: str, has: Callable[[ToyDensity], bool]) -> ValueError:
        others = sorted(k for k, d in TOY_DENSITIES.items() if has(d))
        return ValueError(f"toy density {self.name!r} {what}; {having}: {others}")

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, a float32 tensor of shape ``(n, 2)`` (on the generator's device, else CPU)."""
        return self._draw(n, generator)[0]

    def sample_labeled(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and their labels: ``(n, 2)`` float32 and ``(n,)`` int64 in ``0..num_classes-1``.

        Raises ValueError for an unconditional density (``num_classes == 0``).
        """
        if not self.conditional:
            raise self._refuse(
                "is unconditional (num_classes=0) and has no labels", "labeled densities", lambda d: d.conditional
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

        Every density of :data:`TOY_DENSITIES` has an exact CDF: closed-form masses for ``checkerboard``,
        ``eight_gaussians`` and ``class_mixture``, a 1-D quadrature of Gaussian CDFs along the curve for the others
        (error below 5e-5 in total variation on a 0.25-wide grid; about 1 s for rings and pinwheel). A density
        built without ``cdf`` estimates them from a histogram of 2^22 samples (seed 0), whose own total-variation
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
        """Whether each point of ``x`` ``(n, 2)`` lies in the (closed) support: ``(n,)`` bool; a ValueError for a
        density without a bounded support (:attr:`bounded_support`), whose every point is in it.

        Example:
            >>> import torch
            >>> toy_density("checkerboard").in_support(torch.tensor([[-2.0, -2.0], [-0.5, -2.0]])).tolist()
            [True, False]
        """
        if self._support is None:
            raise self._refuse(
                "has no bounded support (every point has positive density)",
                "densities with one",
                lambda d: d.bounded_support,
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
