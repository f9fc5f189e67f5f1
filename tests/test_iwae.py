"""The importance-weighted bound (IWAE) of TrajectoryDistribution and its bits/dim, on exact Gaussian cases.

The anchor is 1-D Gaussian data x0 ~ N(0, v0) with an identity transporter, so every model is a
linear-Gaussian chain whose marginal p(x_{t_0}) is known in closed form:

* ``GaussianReverse`` is the exact reverse process of the forward chain: every importance weight equals
  p(x_{t_0}), so the IWAE is exact for every K and every draw;
* ``ScaledReverse`` is deliberately wrong (means shrunk, scales inflated): its ELBO has a clear gap that
  the IWAE must close monotonically in K (Burda et al., 2016, Theorem 1).
"""

import math

import pytest
import torch
from test_distribution import GaussianReverse  # the exact reverse process of 1-D Gaussian data

import trajflow
from trajflow.likelihood import dequantize, elbo_bits_per_dim, iwae_bits_per_dim
from trajflow.predictors import MLPPredictor, Predictor
from trajflow.transporters import IdentityTransporter

V0 = 0.7
X = torch.linspace(-2.5, 2.5, 7, dtype=torch.float64)[:, None]


class ScaledReverse(GaussianReverse):
    """A wrong linear-Gaussian reverse model (means shrunk, scales inflated)."""

    def forward(self, u_t, t, s, cond=None, drop_cond=None):
        mu, sigma = super().forward(u_t, t, s)
        return 0.6 * mu, 1.4 * sigma


def _dist(predictor: Predictor, steps: int = 4) -> trajflow.TrajectoryDistribution:
    grid = trajflow.time_grid(steps, 0.0, dtype=torch.float64)
    return trajflow.TrajectoryDistribution(IdentityTransporter(1), predictor, grid)


@torch.no_grad()
def _exact_marginal(dist: trajflow.TrajectoryDistribution, x: torch.Tensor) -> torch.Tensor:
    """log p(x_{t_0}) of a linear-Gaussian chain x_{t_T} ~ N(0, 1), x_s = a x_t + sigma eps (identity f_T)."""
    grid, var = dist.grid, torch.ones((), dtype=torch.float64)
    for k in range(dist.steps, 0, -1):
        t, s = grid[k].reshape(1), grid[k - 1].reshape(1)
        mu, sigma = dist.predictor(torch.ones(1, 1, dtype=torch.float64), t, s)
        var = mu[0, 0] ** 2 * var + sigma[0, 0] ** 2
    return torch.distributions.Normal(0.0, var.sqrt()).log_prob(x[:, 0])


def _mean_bound(dist, num_samples: int, reps: int, seed: int) -> torch.Tensor:
    """The Monte-Carlo mean over ``reps`` independent IWAE estimates, per data point."""
    g = torch.Generator().manual_seed(seed)
    x = X.expand(reps, *X.shape)  # reps independent estimates in one batch
    with torch.no_grad():
        return dist.iwae(x, num_samples, chunk_size=256, generator=g).mean(0)


def test_iwae_is_exact_for_the_true_reverse_process():
    dist = _dist(GaussianReverse(V0))
    exact = _exact_marginal(dist, X)
    # the true model's marginal is the data's: N(0, v0) at t_0 = 0
    assert torch.allclose(exact, torch.distributions.Normal(0.0, math.sqrt(V0)).log_prob(X[:, 0]), atol=1e-12)
    for k in (1, 5, 32):
        got = dist.iwae(X, k, generator=torch.Generator().manual_seed(k))
        assert got.shape == (7,) and got.dtype == torch.float64
        assert torch.allclose(got, exact, atol=1e-9)  # every importance weight is p(x_{t_0})


def test_k1_is_the_elbo_on_the_same_draws():
    dist = _dist(ScaledReverse(V0))
    iw = dist.iwae(X, 1, generator=torch.Generator().manual_seed(3))
    elbo = dist.elbo(X, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(iw, elbo.double())
    # and log_importance_weights is what both are built from
    log_w = dist.log_importance_weights(X, 1, generator=torch.Generator().manual_seed(3))
    assert log_w.shape == (1, 7) and torch.equal(log_w[0], elbo)


def test_chunks_combine_as_one_logsumexp():
    dist = _dist(ScaledReverse(V0))
    got = dist.iwae(X, 7, chunk_size=3, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the chunks draw 3, 3, then 1 trajectories per point, in order
    log_w = torch.cat([dist.log_importance_weights(X, c, generator=g) for c in (3, 3, 1)])
    assert torch.allclose(got, torch.logsumexp(log_w, 0) - math.log(7), atol=1e-12)
    f32 = dist.iwae(X, 7, chunk_size=3, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), got, atol=1e-5)


def test_iwae_increases_with_k_towards_the_exact_marginal():
    dist = _dist(ScaledReverse(V0))
    exact = _exact_marginal(dist, X)
    reps = 400
    bounds = {k: _mean_bound(dist, k, reps, seed=k) for k in (1, 4, 16, 64, 256, 2048)}
    gap = {k: float((exact - b).mean()) for k, b in bounds.items()}
    # The wrong model's ELBO has a real gap (>> the Monte-Carlo error of 400 repetitions) ...
    with torch.no_grad():
        elbo = torch.stack([dist.elbo(X, generator=torch.Generator().manual_seed(100 + i)) for i in range(reps)])
    stderr = float(elbo.std(0).max()) / math.sqrt(reps)
    assert gap[1] > 0.3 and stderr < 0.05
    assert abs(float((exact - elbo.mean(0)).mean()) - gap[1]) < 4 * stderr  # K = 1 is the ELBO
    # ... every bound stays below log p (on average over the points, and for each point up to MC error) ...
    for k, b in bounds.items():
        assert gap[k] > -0.01, (k, gap[k])
        assert bool((b <= exact + 0.05).all()), (k, (b - exact).max())
    # ... and the gap shrinks monotonically in K, to a small fraction of the ELBO's.
    ks = sorted(gap)
    assert all(gap[a] > gap[b] for a, b in zip(ks, ks[1:])), gap
    assert gap[2048] < 0.1 * gap[1], gap


# -- bits/dim ---------------------------------------------------------------------------------------------


def _tiny_ntm():
    torch.manual_seed(0)
    return trajflow.NTM(IdentityTransporter(3), MLPPredictor(3, width=16, depth=1, time_features=8))


def test_iwae_bits_per_dim_uses_the_same_draws():
    model = _tiny_ntm()
    x = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # K = 1: the ELBO's bits/dim, draw for draw
        one = iwae_bits_per_dim(model, x, 256, steps=3, num_trajectories=1, generator=torch.Generator().manual_seed(4))
        elbo = elbo_bits_per_dim(model, x, 256, steps=3, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(one, elbo, atol=1e-9)
        # K = 8: -dist.iwae(dequantize(x)) / (D ln 2) + log2(K / 2), draw for draw
        got = iwae_bits_per_dim(model, x, 256, steps=3, num_trajectories=8, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        y = dequantize(x, 256, g)
        want = -model.distribution(trajflow.time_grid(3)).iwae(y, 8, generator=g) / (3 * math.log(2.0)) + 7.0
        assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-9)
        # the ELBO averaged over 8 trajectories is on the same draws, and never below the IWAE there
        avg = elbo_bits_per_dim(model, x, 256, steps=3, num_trajectories=8, generator=torch.Generator().manual_seed(4))
        assert bool((avg >= got - 1e-9).all())  # Jensen, per point: mean(log w) <= log mean(w)


def test_iwae_bits_per_dim_at_t_min_redraws_the_cleanest_level_per_trajectory():
    """At t_min > 0 each of the K trajectories draws its own x_(t0) from the data (the decoder bound)."""
    model = _tiny_ntm()
    x = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(0))
    grid = trajflow.time_grid(3, 0.02)
    with torch.no_grad():
        got = iwae_bits_per_dim(
            model, x, 256, steps=3, num_trajectories=8, t_min=0.02, generator=torch.Generator().manual_seed(4)
        )
        g = torch.Generator().manual_seed(4)
        y = dequantize(x, 256, g)
        want = model.distribution(grid).iwae(y, 8, generator=g, from_data=True)
        assert torch.allclose(got, -want / (3 * math.log(2.0)) + 7.0, atol=1e-9)
        # the K trajectories start from different x_(t0): the weights are those of from_data=True
        log_w = model.distribution(grid).log_importance_weights(y, 8, generator=g, from_data=True)
        assert log_w.shape == (8, 7) and bool(torch.isfinite(log_w).all())
        # the ELBO on the same 8 draws is never below the IWAE (Jensen, per point), at t_min > 0 too
        avg = elbo_bits_per_dim(
            model, x, 256, steps=3, num_trajectories=8, t_min=0.02, generator=torch.Generator().manual_seed(4)
        )
        assert bool((avg >= got - 1e-9).all())


# -- bad inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, match",
    [
        (0, "got 0"),
        (-3, "got -3"),
        (2.5, r"got 2\.5 \(float\)"),
        (True, r"got True \(bool\)"),
        ("4", r"got '4' \(str\)"),
        (torch.tensor(2.0), "got tensor"),
    ],
)
def test_bad_number_of_samples(k, match):
    dist = _dist(ScaledReverse(V0))
    with pytest.raises(ValueError, match=rf"num_samples: expected an integer >= 1, {match}"):
        dist.iwae(X, k)
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 1"):
        dist.elbo(X, k)


def test_bad_inputs():
    dist = _dist(ScaledReverse(V0))
    with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1, got 0"):
        dist.iwae(X, 4, chunk_size=0)
    with pytest.raises(ValueError, match="dtype: expected torch.float32 or torch.float64, got torch.int64"):
        dist.iwae(X, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"x0: expected finite values, got 1 NaN/inf"):
        dist.iwae(torch.tensor([[0.0], [float("nan")]], dtype=torch.float64), 4)
    with pytest.raises(ValueError, match=r"x0: expected trailing shape \(1,\), got a tensor of shape \(7, 2\)"):
        dist.iwae(torch.zeros(7, 2, dtype=torch.float64), 4)
    # a condition of batch 2 and data of batch 3
    model = trajflow.NTM(IdentityTransporter(2), MLPPredictor(2, num_classes=3, width=16, depth=1))
    cond_dist = model.distribution(trajflow.time_grid(4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"x0: expected leading dims .*batch_shape \(2,\).*got leading shape \(3,\)"):
        cond_dist.iwae(torch.zeros(3, 2), 4)
    assert cond_dist.iwae(torch.zeros(5, 1, 2), 4).shape == (5, 2)  # broadcasting is fine
    x = torch.randint(0, 17, (4, 3))
    tiny = _tiny_ntm()
    with pytest.raises(ValueError, match="bound: expected one of"):
        elbo_bits_per_dim(tiny, x, 17, bound="eubo")
    with pytest.raises(ValueError, match="num_trajectories: expected an integer >= 1, got 0"):
        iwae_bits_per_dim(tiny, x, 17, num_trajectories=0)
    with pytest.raises(ValueError, match=r"num_trajectories: expected an integer >= 1, got 1\.5"):
        iwae_bits_per_dim(tiny, x, 17, num_trajectories=1.5)
    with pytest.raises(ValueError, match="x0: expected leading dims"):
        iwae_bits_per_dim(cond_dist.expand((2,)), torch.randint(0, 17, (3, 2)), 17)


def test_bounds_share_their_draws():
    dist = _dist(ScaledReverse(V0))
    with torch.no_grad():
        iw, elbo = dist.bounds(X, 6, chunk_size=4, generator=torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(2)
        log_w = torch.cat([dist.log_importance_weights(X, c, generator=g) for c in (4, 2)])
    assert torch.allclose(iw, torch.logsumexp(log_w, 0) - math.log(6), atol=1e-12)
    assert torch.allclose(elbo, log_w.mean(0), atol=1e-12)
    assert bool((iw >= elbo).all())  # Jensen on the same draws
    model = _tiny_ntm()
    x = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = elbo_bits_per_dim(
            model, x, 256, 3, 2, bound="both", num_trajectories=4, generator=torch.Generator().manual_seed(1)
        )
        iwae = iwae_bits_per_dim(model, x, 256, 3, 4, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert set(both) == {"iwae", "elbo"} and torch.equal(both["iwae"], iwae)
    assert bool((both["elbo"] >= both["iwae"]).all())
