"""TrajectoryNLL's factor weights: exact in the equal-weight case, the stated weighted sum, pair-mode draws."""

from __future__ import annotations

import math

import pytest
import torch

import trajflow
from trajflow.predictors import MLPPredictor
from trajflow.transporters import ZukoTransporter


@pytest.fixture
def model() -> trajflow.NTM:
    torch.manual_seed(0)
    model = trajflow.NTM(ZukoTransporter(2, hidden_features=(16, 16)), MLPPredictor(2, width=32, depth=2))
    with torch.no_grad():  # away from the identity, so that every factor differs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_equal_weights_are_the_exact_nll(model):
    x0 = torch.randn(16, 2)
    plain = trajflow.TrajectoryNLL(steps=4)(model, x0, generator=torch.Generator().manual_seed(1))
    equal = trajflow.TrajectoryNLL(steps=4, factor_weights=[3, 3, 3, 3])(
        model, x0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(equal, plain)


def test_trajectory_mode_weights_each_factor(model):
    weights = [1.0, 2.0, 4.0, 9.0]
    loss = trajflow.TrajectoryNLL(steps=4, factor_weights=weights, cond_drop=0.0)
    x0 = torch.randn(8, 2)
    (group,) = loss.draw(model, x0, generator=torch.Generator().manual_seed(2))
    prior, factors = group.dist.log_prob_factors(group.traj)  # (8,), (8, 4)
    w = torch.tensor(weights) * 4 / sum(weights)
    expected = -(prior + (factors * w).sum(-1)) / (5 * 2)
    torch.testing.assert_close(loss.group_nll(group), expected)
    # and it is not the unweighted NLL
    assert not torch.allclose(expected, -group.dist.log_prob(group.traj) / 10)


def test_pair_mode_multiplies_the_drawn_factor_by_its_weight(model):
    weights = [0.0, 1.0, 1.0, 2.0]
    loss = trajflow.TrajectoryNLL(steps=4, mode="pair", factor_weights=weights, cond_drop=0.0)
    (group,) = loss.draw(model, torch.randn(64, 2), generator=torch.Generator().manual_seed(3))
    assert set(group.k.tolist()) == {1, 2, 3, 4}  # drawn uniformly, whatever the weights
    w = torch.tensor(weights)[group.k - 1]
    expected = -group.dist.pair_log_prob(group.traj, group.k) / 2 * w
    torch.testing.assert_close(loss.group_nll(group), expected)
    assert (loss.group_nll(group)[group.k == 1] == 0).all()


def test_velocity_weights_follow_flow_matching_emphasis(model):
    loss = trajflow.TrajectoryNLL(steps=4, t_min=(0.02, 0.05), shift=1.5, factor_weights="velocity")
    grid = trajflow.time_grid(4, torch.tensor([0.02, 0.05]), 1.5)  # (2, 5)
    w = loss.weights(grid)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w.mean(-1), torch.ones(2))
    t, s = grid[:, 1:].double(), grid[:, :-1].double()
    _, B, C = trajflow.MarkovInterpolant.posterior(t, s)
    raw = C**2 / (B**2 * t**2)
    torch.testing.assert_close(w.double(), raw / raw.mean(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    # The step from noise (k = T) weighs most, the last step to t_min least.
    assert (w[:, 3] > w[:, 2]).all() and (w[:, 0] < 0.01).all()
    assert math.isfinite(loss(model, torch.randn(32, 2)).item())
    pair = trajflow.TrajectoryNLL(steps=(2, 4), mode="pair", factor_weights="velocity")  # multi-T works too
    assert math.isfinite(pair(model, torch.randn(32, 2)).item())


def test_factor_weight_errors():
    with pytest.raises(ValueError, match=r"factor_weights: expected one weight per step factor \(4"):
        trajflow.TrajectoryNLL(steps=4, factor_weights=[1, 2, 3])
    with pytest.raises(ValueError, match="factor_weights: expected one weight per step factor"):
        trajflow.TrajectoryNLL(steps=(2, 4), factor_weights=[1, 2])
    with pytest.raises(ValueError, match="finite weights >= 0"):
        trajflow.TrajectoryNLL(steps=2, factor_weights=[1, -1])
    with pytest.raises(ValueError, match="not all zero"):
        trajflow.TrajectoryNLL(steps=2, factor_weights=[0, 0])
    with pytest.raises(ValueError, match="finite"):
        trajflow.TrajectoryNLL(steps=2, factor_weights=[1, float("nan")])
    with pytest.raises(ValueError, match="factor_weights: expected None, a list of weights or 'velocity'"):
        trajflow.TrajectoryNLL(steps=2, factor_weights="fm")


def test_a_single_t_min_is_a_fixed_t_min(model):
    # issue 16, item 15: TrajectoryNLL(t_min=0.02) gave "cannot unpack non-iterable float"
    fixed = trajflow.TrajectoryNLL(t_min=0.02)
    assert fixed.t_min == (0.02, 0.02)
    groups = fixed.draw(model, torch.randn(8, 2), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(groups[0].dist.grid[..., 0], torch.full((8,), 0.02))
    for bad in (1.5, (0.1, 0.05), "0.02", (0.0, 0.01, 0.02)):
        with pytest.raises(ValueError, match="t_min: expected"):
            trajflow.TrajectoryNLL(t_min=bad)


def test_an_empty_batch_is_refused_by_name(model):
    # issue 16, item 14: "cannot reshape tensor of 0 elements" (and the mean of nothing would be NaN)
    with pytest.raises(ValueError, match=r"x0: expected a non-empty batch .* got shape \(0, 2\)"):
        trajflow.TrajectoryNLL()(model, torch.zeros(0, 2))


def test_float64_data_is_cast_to_the_models_dtype(model):
    # issue 16, item 13: a float64 batch gave "mat1 and mat2 must have the same dtype"
    x0, loss = torch.randn(16, 2), trajflow.TrajectoryNLL(steps=4)
    single = loss(model, x0, generator=torch.Generator().manual_seed(3))
    double = loss(model, x0.double(), generator=torch.Generator().manual_seed(3))
    assert double.dtype == torch.float32 and torch.equal(single, double)
