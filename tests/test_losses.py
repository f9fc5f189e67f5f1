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


def test_pair_mode_draws_factors_in_proportion_to_the_weights(model):
    loss = trajflow.TrajectoryNLL(steps=4, mode="pair", factor_weights=[0, 1, 1, 2])
    (group,) = loss.draw(model, torch.randn(4000, 2), generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(group.k, minlength=5)[1:].float() / 4000
    assert counts[0] == 0  # weight 0: never drawn
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.25, 0.25, 0.5]), atol=0.03, rtol=0)
    assert math.isfinite(loss(model, torch.randn(64, 2)).item())


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
