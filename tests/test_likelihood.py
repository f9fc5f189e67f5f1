"""Bits/dim of discrete data (trajflow.likelihood): exact offsets, the Jensen bound, the NTM ELBO, errors.

The anchor is a discretised Gaussian whose discrete probabilities are known in closed form (differences of
the normal CDF per bin, independent dimensions). A continuous density that is constant on every bin,
``P(bin) / bin_width``, must give through dequantisation *exactly* the discrete NLL; a smooth Gaussian must
give at least the discrete NLL (Jensen), and nearly the same when it is wide compared with a bin.
"""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

import trajflow
from trajflow.likelihood import (
    bits_per_dim,
    bits_per_dim_offset,
    check_discrete,
    dequantize,
    elbo_bits_per_dim,
    flow_bits_per_dim,
)
from trajflow.predictors import MLPPredictor
from trajflow.transporters import IdentityTransporter, ZukoTransporter

LN2 = math.log(2.0)
RANGES = [(-1.0, 1.0), (0.0, 1.0), "levels"]


def _range(r, levels):
    return (0.0, float(levels)) if r == "levels" else r


def discretized_gaussian(mean: torch.Tensor, std: torch.Tensor, levels: int) -> torch.Tensor:
    """Bin probabilities ``(D, levels)`` of ``clamp(floor(N(mean, std^2)), 0, levels - 1)``, float64.

    ``mean`` and ``std`` are in bin units on the ``[0, levels)`` scale; the two edge bins absorb the tails.
    """
    edges = torch.arange(levels + 1, dtype=torch.float64)
    cdf = torch.special.ndtr((edges[None] - mean[:, None]) / std[:, None])  # (D, K + 1)
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0
    return cdf[:, 1:] - cdf[:, :-1]


def sample_discretized(mean, std, levels, n, generator):
    z = mean + std * torch.randn(n, mean.numel(), generator=generator, dtype=torch.float64)
    return z.floor().clamp(0, levels - 1).to(torch.int64)


def discrete_log_prob(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log P(x)`` summed over dims for ``x`` ``(N, D)`` and bin probabilities ``(D, K)``."""
    return torch.log(probs.gather(1, x.T)).T.sum(-1)


@pytest.fixture
def gaussian_data():
    g = torch.Generator().manual_seed(1)
    levels = 256
    mean = torch.tensor([60.0, 128.0, 200.5, 10.0], dtype=torch.float64)
    std = torch.tensor([5.0, 30.0, 2.0, 12.0], dtype=torch.float64)
    x = sample_discretized(mean, std, levels, 400, g)
    return levels, mean, std, x


# --- offsets ----------------------------------------------------------------------------------------------


def test_offsets():
    assert bits_per_dim_offset(256) == 7.0
    assert bits_per_dim_offset(256, (0, 1)) == 8.0
    assert bits_per_dim_offset(256, (0, 256)) == 0.0
    assert math.isclose(bits_per_dim_offset(17), math.log2(17 / 2))
    assert math.isclose(bits_per_dim_offset(17, (0, 17)), 0.0)
    # -log p / (D ln 2) + offset, elementwise and in float64
    out = bits_per_dim(torch.tensor([0.0, -10.0 * LN2]), dims=5, levels=256)
    assert out.dtype == torch.float64 and torch.allclose(out, torch.tensor([7.0, 9.0], dtype=torch.float64))


def test_dequantize_stays_in_its_box():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(256, dtype=torch.uint8).repeat(50)
    for r in RANGES:
        lo, hi = _range(r, 256)
        y = dequantize(x, 256, g, data_range=(lo, hi))
        assert y.dtype == torch.float32 and y.shape == x.shape
        k = torch.floor((y.double() - lo) * 256 / (hi - lo))
        assert torch.equal(k.long(), x.long())
        assert bool((y >= lo).all()) and bool((y < hi).all())
    # float32 rounding can no longer put the top bin on the edge 1.0
    u_max = torch.tensor([255], dtype=torch.uint8)
    assert float(dequantize(u_max, 256, torch.Generator().manual_seed(3)).max()) < 1.0
    # The standard formula y = 2 (x + u) / K - 1 with the same draws.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y = dequantize(x[:10], 256, g1, dtype=torch.float64)
    u = torch.rand(10, generator=g2, dtype=torch.float64)
    assert torch.allclose(y, 2 * (x[:10].double() + u) / 256 - 1)


# --- exactness on the discretised Gaussian -----------------------------------------------------------------


@pytest.mark.parametrize("r", RANGES)
def test_piecewise_constant_density_gives_the_exact_discrete_nll(gaussian_data, r):
    """p(y) = P(bin(y)) / bin_width on every bin: dequantised bits/dim == exact discrete bits/dim (any u)."""
    levels, mean, std, x = gaussian_data
    lo, hi = _range(r, levels)
    width = (hi - lo) / levels
    probs = discretized_gaussian(mean, std, levels)
    d = x.shape[1]

    def log_density(y: torch.Tensor) -> torch.Tensor:
        k = torch.floor((y.double() - lo) / width).long().clamp(0, levels - 1)
        return discrete_log_prob(probs, k) - d * math.log(width)

    exact = -discrete_log_prob(probs, x) / (d * LN2)
    got = flow_bits_per_dim(
        log_density,
        x,
        levels,
        event_dim=1,
        num_samples=3,
        generator=torch.Generator().manual_seed(0),
        data_range=(lo, hi),
    )
    assert got.shape == (x.shape[0],) and got.dtype == torch.float64
    assert torch.allclose(got, exact, atol=1e-5, rtol=0)
    assert abs(float(got.mean() - exact.mean())) < 1e-5
    # The data's average NLL is close to the distribution's entropy (a sanity check of the fixture).
    entropy = float(-(probs * torch.log(probs.clamp_min(1e-300))).sum() / (d * LN2))
    assert abs(float(exact.mean()) - entropy) < 0.2


def _expected_gaussian_log_density(x, mean, std, lo, width):
    r"""E_u[log N(y; lo + width * mean, (width * std)^2)] for y = lo + width (x + u), in closed form.

    (y - mu) / width = x + u - mean, and E[(x + u - mean)^2] = (x + 1/2 - mean)^2 + 1/12.
    """
    sq = (x.double() + 0.5 - mean).square() + 1.0 / 12.0
    per_dim = -0.5 * sq / std.square() - torch.log(width * std) - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(-1)


@pytest.mark.parametrize("r", RANGES)
def test_jensen_bound_with_a_smooth_gaussian(r):
    """A smooth Gaussian's dequantised bits/dim >= the exact discrete bits/dim of its discretisation."""
    levels, n = 256, 300
    g = torch.Generator().manual_seed(2)
    lo, hi = _range(r, levels)
    width = (hi - lo) / levels
    results = {}
    for name, std in (("narrow", 0.6), ("wide", 25.0)):
        mean = torch.tensor([100.3, 140.7, 128.0], dtype=torch.float64)
        stds = torch.full((3,), std, dtype=torch.float64)
        x = sample_discretized(mean, stds, levels, n, g)
        probs = discretized_gaussian(mean, stds, levels)
        exact = -discrete_log_prob(probs, x) / (3 * LN2)
        deq = bits_per_dim(_expected_gaussian_log_density(x, mean, stds, lo, width), 3, levels, (lo, hi))
        assert bool((deq >= exact - 1e-9).all())  # per data point, not only on average
        results[name] = float((deq - exact).mean())
        # The Monte-Carlo estimate through dequantize() agrees with the closed-form expectation.
        model = Independent(Normal(lo + width * mean, width * stds), 1)
        mc = flow_bits_per_dim(model, x, levels, num_samples=64, generator=g, data_range=(lo, hi))
        # (the narrow Gaussian's -log p varies by ~1 bit across a bin: standard error ~0.005 bits here)
        assert abs(float(mc.mean() - deq.mean())) < 0.02
    assert results["narrow"] > 0.05  # a Gaussian narrower than a bin pays for it
    assert 0 <= results["wide"] < 1e-3  # gap ~ 1 / (24 std^2 ln 2) bits/dim


def test_ranges_agree_for_matching_densities():
    """The same model expressed on the three ranges (densities rescaled by the Jacobian) gives equal bpd."""
    levels = 17
    x = torch.randint(0, levels, (50, 6), generator=torch.Generator().manual_seed(0))
    mean, std = torch.full((6,), 8.0, dtype=torch.float64), torch.full((6,), 3.0, dtype=torch.float64)
    outs = []
    for r in RANGES:
        lo, hi = _range(r, levels)
        width = (hi - lo) / levels
        outs.append(bits_per_dim(_expected_gaussian_log_density(x, mean, std, lo, width), 6, levels, (lo, hi)))
    assert torch.allclose(outs[0], outs[1], atol=1e-10) and torch.allclose(outs[0], outs[2], atol=1e-10)


def test_agrees_with_the_image_dataset_convention():
    """trajflow.data.images uses the same [-1, 1] bins: its bits/dim helper must give the same numbers."""
    pytest.importorskip("sklearn")
    from trajflow.data.images import load_digits

    ds = load_digits("test")
    log_density = torch.tensor([-10.0, 25.0, -130.0], dtype=torch.float64)
    ours = bits_per_dim(log_density, ds.dim, ds.levels)
    assert torch.allclose(ours, ds.bits_per_dim(-log_density), atol=1e-12)
    y = dequantize(ds.images[:5], ds.levels, torch.Generator().manual_seed(0))
    assert torch.equal(ds.from_unit_range(y), ds.images[:5])  # each draw stays in its integer's bin


# --- the NTM ELBO -------------------------------------------------------------------------------------------


def _tiny_ntm(features=2):
    torch.manual_seed(0)
    transporter = ZukoTransporter(features, transforms=1, hidden_features=(16,), time_features=8)
    return trajflow.NTM(transporter, MLPPredictor(features, width=32, depth=1, time_features=8))


def test_ntm_elbo_bits_per_dim_is_finite_and_above_the_entropy():
    levels = 4
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.multinomial(p, 512, replacement=True, generator=g) for p in probs], dim=-1)
    entropy = float(-(probs * probs.log()).sum() / (2 * LN2))  # bits/dim of the data distribution
    model = _tiny_ntm()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = trajflow.TrajectoryNLL(steps=4, t_min=(0.0, 0.0))
    for _ in range(40):  # a little training, so the bound is not trivially far away
        y = dequantize(x[torch.randint(0, 512, (128,), generator=g)], levels, g)
        loss = loss_fn(model, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        bpd = elbo_bits_per_dim(model, x, levels, steps=4, num_samples=2, generator=g)
    assert bpd.shape == (512,) and bpd.dtype == torch.float64
    assert bool(torch.isfinite(bpd).all())
    # E[bpd] >= discrete cross-entropy >= entropy (Jensen + ELBO gap, then Gibbs); the sample mean's
    # standard error is far smaller than the margin an untrained-ish model leaves.
    assert float(bpd.mean()) >= entropy


def test_elbo_bits_per_dim_matches_the_distribution_elbo():
    """Same draws: elbo_bits_per_dim == -dist.elbo(dequantize(x)) / (D ln 2) + log2(K / 2)."""
    model = trajflow.NTM(IdentityTransporter(3), MLPPredictor(3, width=16, depth=1, time_features=8))
    x = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = elbo_bits_per_dim(model, x, 256, steps=3, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        y = dequantize(x, 256, g)
        elbo = model.distribution(trajflow.time_grid(3)).elbo(y, 1, generator=g)
        dist_path = elbo_bits_per_dim(
            model.distribution(trajflow.time_grid(3)), x, 256, generator=torch.Generator().manual_seed(4)
        )
    want = -elbo.double() / (3 * LN2) + 7.0
    assert torch.allclose(got, want, atol=1e-9) and torch.allclose(dist_path, want, atol=1e-9)


def test_bound_at_t_min_is_a_bound_on_the_data_through_the_gaussian_decoder():
    """At t_0 = t_min > 0 the bound is on log p(y) of the NTM followed by N(y; x/(1-t0), (t0/(1-t0))^2 I).

    One step from noise with mu_P = u_t and sigma_P = 1 (an MLPPredictor at initialisation, identity
    transporter) gives p(x_t0) = N(0, 2 I), so the data model is exactly N(0, (2 + t0^2) / (1 - t0)^2 I): the
    IWAE must approach it from below, the ELBO stay below it.
    """
    model = trajflow.NTM(IdentityTransporter(3), MLPPredictor(3, width=16, depth=1, time_features=8))
    t0 = 0.1
    dist = model.distribution(trajflow.time_grid(1, t0))
    y = 1.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    var = (2 + t0**2) / (1 - t0) ** 2
    exact = (-0.5 * y.double() ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(-1)
    with torch.no_grad():
        iwae, elbo = dist.bounds(y, 4096, generator=torch.Generator().manual_seed(1), from_data=True)
        plain = dist.iwae(y, 4096, generator=torch.Generator().manual_seed(1))  # y read as x_(t0) itself
    assert torch.allclose(iwae, exact, atol=0.05) and bool((elbo < exact).all())
    noised = (-0.5 * y.double() ** 2 / 2.0 - 0.5 * math.log(2 * math.pi * 2.0)).sum(-1)  # log N(y; 0, 2 I)
    assert torch.allclose(plain, noised, atol=0.15)  # the other reading: the density of the noised level


def test_elbo_bits_per_dim_at_t_min_draws_the_cleanest_level_from_the_data():
    """Same draws: bpd = -(log p(traj) - log q(x_(t1..T) | x_(t0)) + D log(1 - t_min)) / (D ln 2) + 7."""
    model = trajflow.NTM(IdentityTransporter(3), MLPPredictor(3, width=16, depth=1, time_features=8))
    x = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(0))
    grid = trajflow.time_grid(3, 0.05)
    with torch.no_grad():
        got = elbo_bits_per_dim(model, x, 256, steps=3, t_min=0.05, generator=torch.Generator().manual_seed(4))
        dist_path = elbo_bits_per_dim(model.distribution(grid), x, 256, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        y = dequantize(x, 256, g)
        traj = trajflow.MarkovInterpolant().sample(y[None], grid, generator=g)[0]  # x_(t0) = 0.95 y + 0.05 eps first
        log_w = model.distribution(grid).log_prob(traj) - trajflow.MarkovInterpolant().log_prob(traj, grid)
    want = -(log_w.double() + 3 * math.log1p(-0.05)) / (3 * LN2) + 7.0
    assert torch.allclose(got, want, atol=1e-9) and torch.allclose(dist_path, want, atol=1e-9)


def test_a_level_the_model_never_trained_on_is_not_reported_silently():
    """A flow-matching-initialised NTM has only its scale floor c_min at s = 0: thousands of bits/dim, warned."""
    from trajflow.finetune import init_from_flow_matching
    from trajflow.velocity import MLPVelocity

    torch.manual_seed(0)
    model, _ = init_from_flow_matching(MLPVelocity(features=2, width=16, depth=1))
    x = torch.randint(0, 17, (16, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"t_min: the elbo bound at t_min=0 is .* bits/dim, above the 4.087"):
            at_zero = elbo_bits_per_dim(model, x, 17, generator=torch.Generator().manual_seed(1))
        # untrained, so still above log2(17) (and warned), but no longer dominated by the floor
        with pytest.warns(UserWarning, match=r"t_min: the elbo bound at t_min=0.02 is"):
            at_002 = elbo_bits_per_dim(model, x, 17, t_min=0.02, generator=torch.Generator().manual_seed(1))
    assert float(at_zero.mean()) > 1000 and bool(torch.isfinite(at_002).all())
    assert float(at_002.mean()) < float(at_zero.mean()) / 10


# --- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.tensor([0.0, 1.5]), "fractional"),
        (torch.tensor([0, 256]), r"\[0, 255\]"),
        (torch.tensor([-1, 3]), r"\[0, 255\]"),
        (torch.tensor([0.0, float("nan")]), "finite"),
        (torch.tensor([True, False]), "dtype"),
    ],
)
def test_bad_discrete_data(x, match):
    with pytest.raises(ValueError, match=f"x_int: .*{match}"):
        dequantize(x, 256)
    with pytest.raises(ValueError, match="x_int"):
        flow_bits_per_dim(lambda y: y.sum(-1), x[None], 256, event_dim=1)
    with pytest.raises(ValueError, match="images"):
        check_discrete("images", x, 256)


def test_dequantised_floats_are_refused():
    y = dequantize(torch.tensor([[3, 4]]), 256)
    with pytest.raises(ValueError, match="x_int: .*fractional"):
        elbo_bits_per_dim(_tiny_ntm(), y, 256)


def test_bad_arguments():
    x = torch.randint(0, 17, (4, 2))
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(torch.zeros(2), 2, 17, data_range=(0, 2))
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(torch.zeros(2), 2, 17, data_range=(0, 256))  # (0, levels) only for levels = 17
    with pytest.raises(ValueError, match="data_range"):
        dequantize(x, 17, data_range=3.0)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(torch.zeros(2), 2, 1)
    with pytest.raises(ValueError, match="levels"):
        dequantize(x, 17.0)
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(torch.zeros(2), 0, 17)
    with pytest.raises(ValueError, match="log_density_nats"):
        bits_per_dim(torch.tensor([float("nan")]), 2, 17)
    with pytest.raises(ValueError, match="log_density_nats"):
        bits_per_dim(torch.tensor([1, 2]), 2, 17)
    assert bits_per_dim(torch.tensor([-math.inf]), 2, 17).item() == math.inf
    model = _tiny_ntm()
    with pytest.raises(ValueError, match="num_samples"):
        elbo_bits_per_dim(model, x, 17, num_samples=0)
    with pytest.raises(ValueError, match="x_int: expected trailing shape"):
        elbo_bits_per_dim(model, torch.randint(0, 17, (4, 3)), 17)
    with pytest.raises(ValueError, match=r"t_min: expected the distribution's grid start 0.02 \(or None\), got 0.05"):
        elbo_bits_per_dim(model.distribution(trajflow.time_grid(4, 0.02)), x, 17, t_min=0.05)
    for bad in (-0.1, 1.0, True, "0.02"):
        with pytest.raises(ValueError, match="t_min: expected a time in \\[0, 1\\)"):
            elbo_bits_per_dim(model, x, 17, t_min=bad)
    with pytest.raises(ValueError, match="model_or_dist"):
        elbo_bits_per_dim(object(), x, 17)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flow"):
        flow_bits_per_dim(lambda y: y, x, 17, event_dim=1)  # wrong output shape
