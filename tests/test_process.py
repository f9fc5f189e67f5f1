"""Exact identities of the Markov forward process (method.md section 1)."""

import math

import pytest
import torch

import trajflow
from trajflow import MarkovInterpolant, time_grid
from trajflow.process import sample_t_min, sequence_shift


def test_time_grid_uniform_and_shifted():
    assert torch.allclose(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # Worked values of method.md 1.6: L_seq = 256 (mu = 0.5) and 1024 (mu = 0.63), t_min = 0.02.
    g = time_grid(4, 0.02, sequence_shift(256))
    assert torch.allclose(g, torch.tensor([0.02, 0.355, 0.622, 0.832, 1.0]), atol=1e-3)
    g = time_grid(4, 0.02, sequence_shift(1024))
    assert torch.allclose(g, torch.tensor([0.02, 0.385, 0.652, 0.849, 1.0]), atol=1e-3)


def test_time_grid_per_example_t_min():
    t_min = sample_t_min((6,), 0.0, 0.05, generator=torch.Generator().manual_seed(0))
    g = time_grid(8, t_min)
    assert g.shape == (6, 9)
    assert torch.equal(g[:, 0], t_min) and bool((g[:, 1:] > g[:, :-1]).all()) and bool((g[:, -1] == 1).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 4, "t_min": 0.3}, "t_min"),
        ({"steps": 4, "t_min": -0.1}, "t_min"),
        ({"steps": 4, "shift": 0.0}, "shift"),
        ({"steps": 4, "t_min": float("nan")}, "t_min"),
    ],
)
def test_time_grid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_grid(**kwargs)


def test_marginals_match_flow_matching():
    """x_t ~ N((1 - t) x0, t^2) at every level of the Markov chain (Proposition 1)."""
    proc = MarkovInterpolant()
    grid = time_grid(4, 0.1, 2.0)
    x0 = torch.tensor([1.5, -2.0])
    traj = proc.sample(x0.expand(200_000, 2), grid, generator=torch.Generator().manual_seed(1))
    mean, std = traj.mean(0), traj.std(0)
    for k, t in enumerate(grid):
        assert torch.allclose(mean[k], (1 - t) * x0, atol=0.01)
        assert torch.allclose(std[k], t.expand(2), atol=0.01)


def test_monte_carlo_covariance_matches_S():
    proc = MarkovInterpolant(event_dim=0)
    grid = time_grid(5, 0.05, 1.5)
    traj = proc.sample(torch.zeros(400_000), grid, generator=torch.Generator().manual_seed(2))
    cov = torch.cov(traj.T.double())
    S = proc.covariance(grid.double())
    assert torch.allclose(cov, S, atol=4e-3)
    assert S[-1, -1] == 1 and bool((S[:-1, -1] == 0).all())
    assert torch.allclose(torch.diagonal(S), grid.double() ** 2)


def test_posterior_limits_and_conditioning():
    A, B, C = MarkovInterpolant.posterior(torch.tensor(1.0), torch.tensor([0.0, 0.3, 0.9]))
    assert torch.equal(A, torch.zeros(3))  # at t = 1 the posterior is the marginal at s
    assert torch.allclose(B, 1 - torch.tensor([0.0, 0.3, 0.9])) and torch.allclose(C, torch.tensor([0.0, 0.3, 0.9]))
    t = torch.tensor(0.6, dtype=torch.float64)
    A, B, C = MarkovInterpolant.posterior(t, t - 1e-9)
    assert abs(float(A) - 1) < 1e-6 and abs(float(B)) < 1e-6 and abs(float(C)) < 1e-3
    # Against Gaussian conditioning of (x_s, x_t) given x0, with Cov = S.
    s, t = 0.3, 0.7
    S = MarkovInterpolant.covariance(torch.tensor([s, t, 1.0], dtype=torch.float64))
    gain = S[0, 1] / S[1, 1]
    A, B, C = MarkovInterpolant.posterior(torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    assert math.isclose(float(A), float(gain), rel_tol=1e-12)
    assert math.isclose(float(B), (1 - s) - float(gain) * (1 - t), rel_tol=1e-12)
    assert math.isclose(float(C) ** 2, float(S[0, 0] - gain * S[0, 1]), rel_tol=1e-10)


def test_posterior_rejects_s_not_below_t():
    with pytest.raises(ValueError, match="s < t"):
        MarkovInterpolant.posterior(torch.tensor(0.5), torch.tensor(0.5))
    with pytest.raises(ValueError, match="t: expected times in"):
        MarkovInterpolant.posterior(torch.tensor(1.5), torch.tensor(0.5))


def test_log_prob_of_the_chain():
    proc = MarkovInterpolant()
    grid = time_grid(3, 0.1)
    traj = proc.sample(torch.randn(4, 2), grid)
    expected = torch.zeros(4)
    for k in range(3):
        alpha, sigma = proc.transition(grid[k], grid[k + 1])
        expected += torch.distributions.Normal(alpha * traj[:, k], sigma).log_prob(traj[:, k + 1]).sum(-1)
    assert torch.allclose(proc.log_prob(traj, grid), expected, atol=1e-5)


def test_sample_from_keeps_the_start():
    proc = MarkovInterpolant(event_dim=3)
    x = torch.randn(2, 1, 4, 4)
    traj = proc.sample_from(x, time_grid(4, 0.02))
    assert traj.shape == (2, 5, 1, 4, 4) and torch.equal(traj[:, 0], x)


@pytest.mark.parametrize(
    "grid, match",
    [
        (torch.tensor([0.0, 0.5, 0.4, 1.0]), "ascending"),
        (torch.tensor([-0.1, 0.5, 1.0]), r"\[0.0, 1.0\]"),
        (torch.tensor([0.0, 0.5, 0.9]), "exactly 1"),
        (torch.tensor([1.0]), "T >= 1"),
    ],
)
def test_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        MarkovInterpolant().sample(torch.zeros(3, 2), grid)


def test_bad_x0():
    proc = MarkovInterpolant()
    with pytest.raises(ValueError, match="x0: expected finite"):
        proc.sample(torch.tensor([[0.0, float("nan")]]), time_grid(2))
    with pytest.raises(ValueError, match="traj: expected shape"):
        proc.log_prob(torch.zeros(3, 4, 2), time_grid(4))


def test_one_home_for_the_t_min_defaults():
    """Training draws t_min from TRAIN_T_MIN; sampling, denoising and the t2i recipe use SAMPLE_T_MIN inside it."""
    import inspect

    from examples.t2i.evaluation.levels import ntm_level_estimates
    from trajflow.denoise import DistillationLoss, fast_sample
    from trajflow.likelihood import elbo_bits_per_dim
    from trajflow.process import SAMPLE_T_MIN, TRAIN_T_MIN

    assert TRAIN_T_MIN == (0.0, 0.05) and TRAIN_T_MIN[0] < SAMPLE_T_MIN == 0.02 < TRAIN_T_MIN[1]
    assert trajflow.TrajectoryNLL().t_min == TRAIN_T_MIN

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(trajflow.NTM.sample, "t_min") == SAMPLE_T_MIN  # was 0: trajectory denoising did nothing
    assert default(fast_sample, "t_min") == default(ntm_level_estimates, "t_min") == SAMPLE_T_MIN
    assert DistillationLoss.__dataclass_fields__["t_min"].default == (SAMPLE_T_MIN, SAMPLE_T_MIN)
    assert default(elbo_bits_per_dim, "t_min") is None  # None: TRAIN_T_MIN[0], see its docstring
    model = trajflow.NTM(
        trajflow.transporters.IdentityTransporter((2,)), trajflow.predictors.MLPPredictor(features=2, width=8, depth=1)
    )
    traj = model.sample((3,), steps=2, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    again = model.sample((3,), steps=2, grid=time_grid(2, SAMPLE_T_MIN), generator=torch.Generator().manual_seed(0))
    assert torch.equal(traj[:, 0], again)
    pytest.importorskip("accelerate")  # the t2i recipe imports the trainer
    from examples.t2i.config import ModelConfig, SampleConfig
    from examples.t2i.sampling import DEFAULT_DENOISE_T_MIN, generate

    assert ModelConfig().t_min == TRAIN_T_MIN and SampleConfig().t_min == DEFAULT_DENOISE_T_MIN == SAMPLE_T_MIN
    assert default(generate, "t_min") == SAMPLE_T_MIN


def test_transition_refuses_times_outside_the_unit_interval_and_nan():
    # issue 16, item 9: transition(s=0.5, t=1.5) gave alpha = -1
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\], got values in \[1.5, 1.5\]"):
        MarkovInterpolant.transition(torch.tensor(0.5), torch.tensor(1.5))
    with pytest.raises(ValueError, match="s: expected finite values"):
        MarkovInterpolant.transition(torch.tensor(float("nan")), torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"\(s, t\): expected s <= t and s < 1"):
        MarkovInterpolant.transition(torch.tensor(0.75), torch.tensor(0.5))
    alpha, sigma = MarkovInterpolant.transition(torch.tensor(0.5), torch.tensor(1.5), validate=False)
    assert float(alpha) == -1.0  # validate=False skips the checks and keeps the formula
    alpha, sigma = MarkovInterpolant.transition(torch.tensor(0.25), torch.tensor(0.5))
    assert math.isclose(float(alpha), 0.5 / 0.75, rel_tol=1e-6) and float(sigma) > 0


def test_time_grid_levels_that_round_together_are_refused():
    # found by tests/test_fuzz.py: shift=1e-136 passed in float64, then every level rounded to 0 in float32
    with pytest.raises(ValueError, match="shift: expected grid levels that stay positive and distinct"):
        time_grid(2, 0.0, 1e-136)
    with pytest.raises(ValueError, match="t_min: expected values below the first level"):
        time_grid(4, 0.25 - 1e-12)  # below 0.25 in float64, equal to it in float32
