"""Sample distances: known values, closed forms, estimator options and input errors; the histogram distance
sees the fine structure that the sample distances miss."""

import math

import numpy as np
import pytest
import torch

from trajflow.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    histogram_2d,
    histogram_distance,
    sliced_wasserstein,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- energy distance ------------------------------------------------------------------------------------


def test_energy_identical_is_zero_and_shift_positive():
    x = torch.randn(600, 3, generator=_gen())
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x + 1.0) > 0.5


def test_energy_hand_computed():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    # E|X-Y| = (3 + 2) / 2; V-stat E|X-X'| = (0 + 1 + 1 + 0) / 4; E|Y-Y'| = 0.
    assert energy_distance(x, y) == pytest.approx(2 * 2.5 - 0.5 - 0.0)
    z = torch.tensor([[3.0], [5.0]])
    # U-stat: E|X-X'| = 1, E|Z-Z'| = 2, E|X-Z| = (3 + 5 + 2 + 4) / 4.
    assert energy_distance(x, z, unbiased=True) == pytest.approx(2 * 3.5 - 1 - 2)


def test_energy_1d_normal_shift_closed_form():
    # For N(0,1) vs N(m,1) in 1-D: 2 E|m + sqrt2 Z| - 2 E|sqrt2 Z|, with E|N(m, s^2)| folded-normal mean.
    m = 1.0
    s = math.sqrt(2.0)
    folded = s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * math.erf(m / (s * math.sqrt(2)))
    expected = 2 * folded - 2 * s * math.sqrt(2 / math.pi)
    x = torch.randn(4000, 1, generator=_gen(1))
    y = torch.randn(4000, 1, generator=_gen(2)) + m
    assert energy_distance(x, y, unbiased=True) == pytest.approx(expected, abs=0.03)


def test_energy_chunking_matches_direct(monkeypatch):
    import trajflow.metrics as metrics

    x = torch.randn(300, 2, generator=_gen(3))
    y = torch.randn(200, 2, generator=_gen(4)) * 2
    full = energy_distance(x, y)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 1000)  # forces blocks of 3-5 rows
    assert energy_distance(x, y) == pytest.approx(full, rel=1e-10)
    direct = 2 * torch.cdist(x.double(), y.double()).mean() - torch.cdist(x.double(), x.double()).mean()
    direct -= torch.cdist(y.double(), y.double()).mean()
    assert full == pytest.approx(float(direct), rel=1e-10)


def test_energy_unbiased_vs_v_statistic():
    x = torch.randn(50, 2, generator=_gen(5))
    y = torch.randn(70, 2, generator=_gen(6))
    v, u = energy_distance(x, y), energy_distance(x, y, unbiased=True)
    assert v >= 0 and u < v  # removing the zero diagonal raises the within-sample means


# --- sliced Wasserstein ---------------------------------------------------------------------------------


def test_sw_identical_zero_and_1d_shift_exact():
    x = torch.randn(1000, 1, generator=_gen(), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    # In 1-D every direction is +-1 and sorting commutes with the shift: exactly m^2.
    assert sliced_wasserstein(x, x + 0.7) == pytest.approx(0.49, rel=1e-9)
    assert sliced_wasserstein(x, x + 0.7, squared=False) == pytest.approx(0.7, rel=1e-9)


def test_sw_normal_shift_closed_form():
    # N(0, I) vs N(m, I): each direction gives W2^2 = (theta . m)^2, averaging |m|^2 / d over the sphere.
    d, m = 4, torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    expected = float(m.square().sum()) / d
    x = torch.randn(2000, d, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(2000, d, generator=_gen(2), dtype=torch.float64) + m
    assert sliced_wasserstein(x, y, projections=400, generator=_gen(3)) == pytest.approx(expected, rel=0.15)
    # With the same points shifted, sorting commutes with the shift, so each direction gives (theta . m)^2
    # exactly and the only randomness left is the choice of directions.
    x = x[:20]
    assert sliced_wasserstein(x, x + m, projections=20000, generator=_gen(3)) == pytest.approx(expected, rel=0.03)


def test_sw_unequal_sizes_exact():
    x = torch.randn(300, 2, generator=_gen(4))
    # The same empirical distribution with every point twice: distance exactly 0.
    assert sliced_wasserstein(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)
    # 1-D hand case: {0, 1} vs {0, 0.5, 1}: quantiles differ by 0.5 on (1/3, 1/2] and (1/2, 2/3].
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein(a, b) == pytest.approx(2 * (1 / 6) * 0.25, rel=1e-9)


def test_sw_deterministic_default_and_generator():
    x = torch.randn(200, 3, generator=_gen(5))
    y = torch.randn(250, 3, generator=_gen(6))
    assert sliced_wasserstein(x, y) == sliced_wasserstein(x, y)
    assert sliced_wasserstein(x, y, generator=_gen(1)) == sliced_wasserstein(x, y, generator=_gen(1))
    assert sliced_wasserstein(x, y, generator=_gen(1)) != sliced_wasserstein(x, y, generator=_gen(2))


# --- Fréchet distance -----------------------------------------------------------------------------------


def test_frechet_diagonal_gaussians_closed_form():
    f64 = torch.float64
    m1, m2 = torch.tensor([0.0, 1.0, -1.0], dtype=f64), torch.tensor([1.0, 1.0, 2.0], dtype=f64)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=f64), torch.tensor([2.0, 1.0, 1.0], dtype=f64)
    expected = float((m1 - m2).square().sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    assert frechet_distance_from_stats(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # From samples: whitened noise makes the sample moments exactly the target ones.
    n = 500
    z = torch.randn(n, 3, generator=_gen(7), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # sample cov = I
    fx, fy = m1 + z * v1.sqrt(), m2 + z * v2.sqrt()
    assert frechet_distance(fx, fy) == pytest.approx(expected, rel=1e-8)


def test_frechet_full_covariance_against_eig_formula():
    a = torch.randn(3, 3, generator=_gen(8), dtype=torch.float64)
    b = torch.randn(3, 3, generator=_gen(9), dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(3), b @ b.T + 0.1 * torch.eye(3)
    # tr((S1 S2)^(1/2)) = sum of sqrt of the (real, positive) eigenvalues of S1 S2.
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = float(torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt)
    assert frechet_distance_from_stats(torch.zeros(3), s1, torch.zeros(3), s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_identical_zero_and_stats():
    f = torch.randn(400, 5, generator=_gen(10))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    mu, cov = gaussian_stats(f)
    assert torch.allclose(cov, torch.from_numpy(np.cov(f.double().numpy(), rowvar=False)))
    assert torch.allclose(mu, f.double().mean(0))


def test_metrics_accept_numpy():
    x = np.random.default_rng(0).normal(size=(100, 2))
    assert energy_distance(x, x + 1) > 0
    assert sliced_wasserstein(x, x + 1) > 0
    assert frechet_distance(x, x + 1) == pytest.approx(2.0, rel=1e-9)


# --- histogram distance ---------------------------------------------------------------------------------

EDGES = torch.tensor([0.0, 0.5, 1.0])
UNIFORM = torch.full((2, 2), 0.25)


def test_histogram_2d_half_open_bins_and_outside():
    x = torch.tensor([[0.0, 0.0], [0.5, 0.49], [0.99, 0.5], [1.0, 0.2], [-0.1, 0.2], [0.2, 7.0]])
    # [0, 0.5) and [0.5, 1): an inner edge counts in the bin above it, the last edge and beyond in none.
    assert histogram_2d(x, EDGES).tolist() == [[1 / 6, 0.0], [1 / 6, 1 / 6]]
    assert histogram_2d(x.numpy(), EDGES.numpy()).dtype == torch.float64


def test_histogram_distance_hand_values():
    x = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert histogram_distance(x, UNIFORM, EDGES) == 0.0
    assert histogram_distance(x[:2], UNIFORM, EDGES) == pytest.approx(0.5)  # all of it on the bottom row
    assert histogram_distance(x + 5.0, UNIFORM, EDGES) == pytest.approx(1.0)  # all of it outside the grid
    # A distribution with half its mass outside the grid: the outside is one more cell.
    half = torch.full((2, 2), 0.125)
    assert histogram_distance(torch.cat([x, x + 5.0]), half, EDGES) == pytest.approx(0.0)
    assert histogram_distance(x, half, EDGES) == pytest.approx(0.5)
    assert histogram_distance(x.double().numpy(), UNIFORM.numpy(), EDGES.numpy()) == 0.0


def test_histogram_distance_sees_a_blur_that_energy_distance_misses():
    """The point of the metric (issue 16, item 12): a blur of N(0, 0.3^2), larger than the spirals' own noise
    (std 0.1), leaves the energy distance inside its sampling noise but multiplies the histogram distance."""
    from trajflow.data.toy import toy_density

    density, n, g = toy_density("spirals"), 5000, _gen(0)
    edges = torch.linspace(-4.5, 4.5, 37)
    p = density.bin_masses(edges)
    x, test = density.sample(n, generator=g), density.sample(n, generator=g)
    blurred = x + 0.3 * torch.randn(n, 2, generator=g)
    # A sample of the density itself sits at the sampling floor, sum_k sqrt(p_k / (2 pi n)) (about 0.1 here).
    floor = float((p / (2 * math.pi * n)).sqrt().sum())
    clean_tv, blurred_tv = histogram_distance(x, p, edges), histogram_distance(blurred, p, edges)
    assert 0.85 * floor < clean_tv < 1.15 * floor, (clean_tv, floor)
    assert blurred_tv > 3 * clean_tv and blurred_tv - clean_tv > 0.25, (blurred_tv, clean_tv)
    # The energy distance barely moves: within the data-vs-data noise of 5,000 points (about 1e-3).
    clean_ed = energy_distance(x, test, unbiased=True)
    blurred_ed = energy_distance(blurred, test, unbiased=True)
    assert abs(clean_ed) < 0.002 and abs(blurred_ed - clean_ed) < 0.002, (clean_ed, blurred_ed)


@pytest.mark.parametrize(
    "samples, bin_probs, edges, match",
    [
        (torch.zeros(4, 3), UNIFORM, EDGES, "samples: expected 2 columns"),
        (torch.zeros(4), UNIFORM, EDGES, "samples: expected a 2-D"),
        (torch.tensor([[0.0, float("nan")]]), UNIFORM, EDGES, "samples: expected finite"),
        (torch.zeros(4, 2), UNIFORM, torch.tensor([0.0, 1.0, 0.5]), "edges: expected strictly ascending"),
        (torch.zeros(4, 2), UNIFORM, torch.tensor([0.0]), "edges: expected a 1-D tensor of at least 2"),
        (torch.zeros(4, 2), UNIFORM, torch.tensor([0.0, float("inf"), 2.0]), "edges: expected finite"),
        (torch.zeros(4, 2), UNIFORM, [0.0, 0.5, 1.0], "edges: expected a torch.Tensor"),
        (torch.zeros(4, 2), torch.full((3, 3), 0.1), EDGES, r"bin_probs: expected shape \(2, 2\)"),
        (torch.zeros(4, 2), torch.full((2, 2), 0.3), EDGES, "bin_probs: expected non-negative .* at most 1"),
        (torch.zeros(4, 2), torch.tensor([[0.5, -0.1], [0.1, 0.1]]), EDGES, "bin_probs: expected non-negative"),
        (torch.zeros(4, 2), torch.tensor([[0.5, float("nan")], [0.1, 0.1]]), EDGES, "bin_probs: expected finite"),
        (torch.zeros(4, 2), [[0.25, 0.25], [0.25, 0.25]], EDGES, "bin_probs: expected a torch.Tensor"),
    ],
)
def test_histogram_distance_bad_inputs_name_the_argument(samples, bin_probs, edges, match):
    with pytest.raises(ValueError, match=match):
        histogram_distance(samples, bin_probs, edges)


# --- input errors ---------------------------------------------------------------------------------------

GOOD = torch.zeros(4, 2)


@pytest.mark.parametrize(
    "fn, names",
    [
        (energy_distance, ("x", "y")),
        (sliced_wasserstein, ("x", "y")),
        (frechet_distance, ("feats_x", "feats_y")),
    ],
)
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(4), "2-D"),
        (torch.zeros(2, 2, 2), "2-D"),
        (torch.zeros(0, 2), "at least"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), "finite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), "finite"),
        ([[0.0, 1.0]], "Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(fn, names, bad, match):
    with pytest.raises(ValueError, match=f"{names[0]}:.*{match}"):
        fn(bad, GOOD)
    with pytest.raises(ValueError, match=f"{names[1]}:.*{match}"):
        fn(GOOD, bad)


@pytest.mark.parametrize("fn, name", [(energy_distance, "y"), (sliced_wasserstein, "y"), (frechet_distance, "feats_y")])
def test_width_mismatch(fn, name):
    with pytest.raises(ValueError, match=f"{name}: expected the same feature width"):
        fn(torch.zeros(4, 2), torch.zeros(4, 3))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="projections"):
        sliced_wasserstein(GOOD, GOOD, projections=0)
    with pytest.raises(ValueError, match="generator"):
        sliced_wasserstein(GOOD, GOOD, generator=1)
    with pytest.raises(ValueError, match="feats_x: expected at least 2"):
        frechet_distance(torch.zeros(1, 2), GOOD)
    with pytest.raises(ValueError, match="x: expected at least 2"):
        energy_distance(torch.zeros(1, 2), GOOD, unbiased=True)
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance_from_stats(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance_from_stats(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(2))
