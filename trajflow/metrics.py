"""Sample-based distances between distributions, for toy densities and learned image features.

:func:`energy_distance` (data units), :func:`sliced_wasserstein` (squared units) and :func:`frechet_distance`
(squared feature units) compare two ``(n, d)`` samples (tensors on any device, or numpy arrays) in float64 and
return a ``float``; a ValueError names an input that is not 2-D, is empty, holds NaN/inf, or whose width
differs. :func:`histogram_distance` compares a 2-D sample with a *known* distribution's bin masses (e.g.
:meth:`trajflow.data.ToyDensity.bin_masses`): on a fine grid it sees a blur finer than the data's spread,
which the others barely do. :func:`histogram_2d` is the histogram.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 3.0
    >>> energy_distance(x, x)
    0.0
    >>> energy_distance(x, y) > 1.0
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .checks import check_edges, check_finite

__all__ = [
    "energy_distance",
    "histogram_2d",
    "histogram_distance",
    "sliced_wasserstein",
    "frechet_distance",
    "gaussian_stats",
    "frechet_distance_from_stats",
]

# Pairwise-distance blocks hold at most this many float64 entries (~128 MB): large samples go in row chunks.
_BLOCK_ELEMENTS = 1 << 24


def _as_samples(name: str, value: object, *, min_rows: int = 1) -> Tensor:
    """Check that ``value`` is a finite 2-D ``(n, d)`` sample and return it as float64."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or numpy array of shape (n, d), got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor of shape (n, d), got shape {tuple(value.shape)}")
    if value.shape[0] < min_rows or value.shape[1] < 1:
        raise ValueError(f"{name}: expected at least {min_rows} row(s) and 1 column, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {value.dtype}")
    value = value.to(torch.float64)
    check_finite(name, value)
    return value


def _same_width(x: Tensor, y: Tensor, names: tuple[str, str]) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[1]}: expected the same feature width as {names[0]} ({x.shape[1]}), got {y.shape[1]}")


def _mean_pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{i,j} |a_i - b_j|`` over all pairs, in row chunks that keep each block under the budget."""
    rows = max(1, _BLOCK_ELEMENTS // max(b.shape[0], 1))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], rows):
        total += torch.cdist(a[start : start + rows], b).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples (Euclidean norm).

    In the data's unit; zero exactly when the distributions are equal, linear in a shift larger than the
    spread. ``unbiased=False`` gives the V-statistic (the distance between the empirical distributions:
    ``>= 0``, biased up by ``O(1/n)``), ``unbiased=True`` the U-statistic (within-sample means skip ``i = j``:
    unbiased, possibly slightly negative, 2+ rows per sample). Cost ``O(n m d)``, memory about 128 MB at most.

    Arguments:
        x: Sample ``(n, d)``.
        y: Sample ``(m, d)`` (any ``m``).
        unbiased: Use the U-statistic instead of the V-statistic.

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 1); y = torch.ones(4, 1)
        >>> energy_distance(x, y)       # 2 * 1 - 0 - 0
        2.0
    """
    min_rows = 2 if unbiased else 1
    x = _as_samples("x", x, min_rows=min_rows)
    y = _as_samples("y", y, min_rows=min_rows)
    _same_width(x, y, ("x", "y"))
    y = y.to(x.device)
    n, m = x.shape[0], y.shape[0]
    xy = _mean_pairwise_distance(x, y)
    xx = _mean_pairwise_distance(x, x)
    yy = _mean_pairwise_distance(y, y)
    if unbiased:
        # The diagonal terms are zero, so rescaling the all-pairs mean removes them from the average.
        xx = xx * n / (n - 1)
        yy = yy * m / (m - 1)
    return float(2.0 * xy - xx - yy)


def _w2_squared_1d(px: Tensor, py: Tensor) -> Tensor:
    """Exact squared W2 between the empirical distributions of the columns of ``px`` (n, P) and ``py`` (m, P).

    W2^2 = int_0^1 (Qx(q) - Qy(q))^2 dq of the empirical quantile functions: with equal sizes the mean squared
    difference of sorted values, otherwise integrated exactly over the merged breakpoints ``i / n``, ``j / m``.
    """
    sx, sy = px.sort(dim=0).values, py.sort(dim=0).values
    n, m = sx.shape[0], sy.shape[0]
    if n == m:
        return ((sx - sy) ** 2).mean(dim=0)
    device = px.device
    # Breakpoints on an integer grid of step 1 / lcm would be exact but huge; float64 levels are exact
    # enough (each interval is identified by its midpoint, far from any breakpoint).
    levels = torch.cat(
        [
            torch.arange(1, n + 1, dtype=torch.float64, device=device) / n,
            torch.arange(1, m + 1, dtype=torch.float64, device=device) / m,
        ]
    )
    levels = torch.unique(levels)  # sorted; breakpoints shared by both grids (e.g. 1.0) appear once
    lower = torch.cat([levels.new_zeros(1), levels[:-1]])
    widths = levels - lower
    keep = widths > 1e-15  # drop near-duplicate breakpoints created by float rounding of equal fractions
    mids, widths = ((lower + levels) / 2)[keep], widths[keep]
    ix = torch.clamp((mids * n).floor().long(), max=n - 1)
    iy = torch.clamp((mids * m).floor().long(), max=m - 1)
    return (widths[:, None] * (sx[ix] - sy[iy]) ** 2).sum(dim=0)


def sliced_wasserstein(
    x: Tensor, y: Tensor, projections: int = 128, generator: torch.Generator | None = None, *, squared: bool = True
) -> float:
    """Sliced Wasserstein-2 distance: squared 1-D W2 averaged over random directions.

    ``SW_2^2(X, Y) = E_theta[ W_2^2(<theta, X>, <theta, Y>) ]`` over ``projections`` random unit directions,
    each 1-D W2 exact for the two empirical distributions (any sample sizes). Squared data units
    (``squared=False``: data units); a shift ``m`` in ``d`` dimensions gives ``|m|^2 / d``. Without a
    ``generator`` the directions come from a fresh one seeded with 0, so that models compared in one script
    see the same directions.

    Arguments:
        x: Sample ``(n, d)``.
        y: Sample ``(m, d)``.
        projections: Number of random directions (the Monte-Carlo error shrinks like ``1/sqrt(projections)``).
        generator: Source of the directions (its device is used to draw them).
        squared: Return ``SW_2^2`` (default) or ``SW_2``.

    Example:
        >>> import torch
        >>> x = torch.linspace(-1, 1, 101)[:, None]
        >>> round(sliced_wasserstein(x, x + 0.5), 6)      # 1-D: every direction is +-1, W2^2 = 0.25
        0.25
    """
    x = _as_samples("x", x)
    y = _as_samples("y", y)
    _same_width(x, y, ("x", "y"))
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ValueError(f"projections: expected a positive integer, got {projections!r}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    y = y.to(x.device)
    theta = torch.randn(x.shape[1], projections, generator=generator, device=generator.device, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    sw2 = _w2_squared_1d(x @ theta, y @ theta).mean()
    value = float(sw2)
    return value if squared else math.sqrt(max(value, 0.0))


def gaussian_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (float64, unbiased ``1/(n-1)``) of features ``(n, d)``.

    Cache these for a reference set and pass them to :func:`frechet_distance_from_stats`.

    Example:
        >>> import torch
        >>> mu, cov = gaussian_stats(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        >>> mu.tolist(), cov.tolist()
        ([1.0, 0.0], [[2.0, 0.0], [0.0, 0.0]])
    """
    feats = _as_samples("feats", feats, min_rows=2)
    mu = feats.mean(dim=0)
    centred = feats - mu
    cov = centred.T @ centred / (feats.shape[0] - 1)
    return mu, cov


def _psd_sqrt(mat: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigendecomposition (negative eigenvalues -> 0)."""
    evals, evecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``; see :func:`frechet_distance`.

    Example:
        >>> import torch
        >>> frechet_distance_from_stats(torch.zeros(2), torch.eye(2), torch.ones(2), 4 * torch.eye(2))
        4.0
    """
    _check_stats(mu1, cov1, mu2, cov2)
    mu1 = mu1.to(torch.float64)
    mu2, cov1, cov2 = (t.to(mu1) for t in (mu2, cov1, cov2))
    # tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the right side is symmetric PSD, so a symmetric
    # eigendecomposition (no scipy.linalg.sqrtm, no complex parts) gives its eigenvalues stably.
    root1 = _psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * trace_sqrt
    # Rounding can push a zero distance a hair below 0; the distance itself is never negative.
    return max(float(value), 0.0)


def _check_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> None:
    args = {"mu1": mu1, "cov1": cov1, "mu2": mu2, "cov2": cov2}
    for name, value in args.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        check_finite(name, value.to(torch.float64))
    if mu1.dim() != 1:
        raise ValueError(f"mu1: expected a 1-D mean vector, got shape {tuple(mu1.shape)}")
    d = mu1.shape[0]
    for name, shape, like in (("mu2", (d,), " like mu1"), ("cov1", (d, d), ""), ("cov2", (d, d), "")):
        if args[name].shape != shape:
            raise ValueError(f"{name}: expected shape {shape}{like}, got {tuple(args[name].shape)}")


def frechet_distance(feats_x: Tensor, feats_y: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature samples.

    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` with the means and unbiased covariances of
    ``feats_x (n, d)`` and ``feats_y (m, d)`` (float64 symmetric eigendecompositions, no scipy): FID's formula,
    comparable only between runs with the same feature extractor. Squared feature units; 2+ rows per sample
    (more than ``d`` for a full-rank covariance).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(4000, 3, generator=g); b = torch.randn(4000, 3, generator=g) + 1.0
        >>> abs(frechet_distance(a, b) - 3.0) < 0.2     # |m|^2 = 3 for a shift by 1 in each of 3 coordinates
        True
    """
    x = _as_samples("feats_x", feats_x, min_rows=2)
    y = _as_samples("feats_y", feats_y, min_rows=2)
    _same_width(x, y, ("feats_x", "feats_y"))
    mu1, cov1 = gaussian_stats(x)
    mu2, cov2 = gaussian_stats(y.to(x.device))
    return frechet_distance_from_stats(mu1, cov1, mu2, cov2)


def histogram_2d(samples: Tensor, edges: Tensor) -> Tensor:
    """The share of ``samples`` ``(n, 2)`` in each cell of the square grid ``edges x edges``: ``(B, B)`` float64
    on the CPU, ``[i, j]`` for ``x`` in bin ``i`` and ``y`` in bin ``j`` (``B = len(edges) - 1``).

    Bins are half-open, ``[e_i, e_{i+1})``; samples outside ``[e_0, e_B)`` are in no bin (the result sums to
    the share inside the grid).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.1, 0.1], [0.1, 0.9], [0.6, 0.2], [2.0, 0.5]])
        >>> histogram_2d(x, torch.tensor([0.0, 0.5, 1.0])).tolist()
        [[0.25, 0.25], [0.25, 0.0]]
    """
    x, edges = _points_2d(samples), check_edges("edges", edges)
    return _shares(x.cpu(), edges)


def _points_2d(samples: object) -> Tensor:
    x = _as_samples("samples", samples)
    if x.shape[1] != 2:
        raise ValueError(f"samples: expected 2 columns (a 2-D sample), got shape {tuple(x.shape)}")
    return x


def _shares(x: Tensor, edges: Tensor) -> Tensor:
    """:func:`histogram_2d` of checked float64 CPU inputs."""
    bins = edges.shape[0] - 1
    idx = torch.bucketize(x, edges, right=True) - 1  # [e_i, e_{i+1}) -> i; below e_0 -> -1, from e_B on -> B
    inside = ((idx >= 0) & (idx < bins)).all(dim=1)
    flat = idx[inside, 0] * bins + idx[inside, 1]
    counts = torch.bincount(flat, minlength=bins * bins).to(torch.float64)
    return (counts / x.shape[0]).reshape(bins, bins)


def histogram_distance(samples: Tensor, bin_probs: Tensor, edges: Tensor) -> float:
    """Total variation between the histogram of a 2-D sample and a known distribution's bin masses.

    ``TV = sum |q - p| / 2`` over the ``B x B`` bins of :func:`histogram_2d` plus one cell outside the grid
    (true mass ``1 - bin_probs.sum()``), ``q`` the sample's shares and ``p`` the true masses: the share of mass
    in the wrong cell, a lower bound on the true total variation (finer grids see finer structure). Even a
    perfect sampler scores about ``sum_k sqrt(p_k / (2 pi n))`` for ``n`` samples: compare with a true sample
    of the same size, not with 0. (No KL: one empty cell or one sample off the support makes it infinite.)

    Arguments:
        samples: ``(n, 2)`` sample (any real dtype, any device, or a numpy array), finite.
        bin_probs: ``(B, B)`` true probability of each bin, non-negative, summing to at most 1.
        edges: ``(B + 1,)`` strictly ascending bin edges, the same for both coordinates.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
        >>> edges, uniform = torch.tensor([0.0, 0.5, 1.0]), torch.full((2, 2), 0.25)
        >>> histogram_distance(x, uniform, edges)
        0.0
        >>> histogram_distance(x[:2], uniform, edges)  # the bottom row only: half of the mass misplaced
        0.5
    """
    x, edges = _points_2d(samples), check_edges("edges", edges)
    p = _check_bin_probs(bin_probs, edges.shape[0] - 1)
    q = _shares(x.cpu(), edges)
    outside = abs((1.0 - float(q.sum())) - max(1.0 - float(p.sum()), 0.0))
    return 0.5 * (float((q - p).abs().sum()) + outside)


def _check_bin_probs(bin_probs: object, bins: int) -> Tensor:
    """``bin_probs`` as float64 on the CPU, checked: ``(bins, bins)``, finite, non-negative, summing to at most 1."""
    if isinstance(bin_probs, np.ndarray):
        bin_probs = torch.from_numpy(bin_probs)
    if not isinstance(bin_probs, Tensor):
        raise ValueError(
            f"bin_probs: expected a torch.Tensor of shape ({bins}, {bins}), got {type(bin_probs).__name__}"
        )
    if tuple(bin_probs.shape) != (bins, bins):
        raise ValueError(
            f"bin_probs: expected shape ({bins}, {bins}) to match {bins + 1} edges, got {tuple(bin_probs.shape)}"
        )
    p = check_finite("bin_probs", bin_probs.detach().to("cpu", torch.float64))
    total = float(p.sum())
    if bool((p < 0).any()) or total > 1.0 + 1e-6:
        raise ValueError(
            f"bin_probs: expected non-negative probabilities summing to at most 1, got minimum "
            f"{float(p.min()):.3g} and sum {total:.9g}"
        )
    return p
