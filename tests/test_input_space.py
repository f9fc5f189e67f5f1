"""A predictor that reads data space (``input_space="data"``): exact densities, sampling that inverts every
level, and the property that makes the option matter: with the paper's transporter-space input, a predictor
that does not change makes the transporter act on the samples only through its inverse at the last level."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

from trajflow import NTM, time_grid
from trajflow.contrib.pyro import trajectory_from_noise
from trajflow.finetune import init_from_flow_matching
from trajflow.predictors.from_velocity import FlowMatchingPredictor
from trajflow.velocity import MLPVelocity


def _model(input_space: str, seed: int = 0, randomise_transporter: bool = True) -> NTM:
    """An FM-initialised NTM on 2-d vectors in float64 whose transporter is moved off the identity."""
    torch.manual_seed(seed)
    velocity = MLPVelocity(features=2, width=16, depth=1).double()
    model, _ = init_from_flow_matching(velocity, input_space=input_space)
    model = model.double()
    with torch.no_grad():
        for p in velocity.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if randomise_transporter:
            for p in model.transporter.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


GRID = time_grid(3, 0.05, dtype=torch.float64)


def test_data_space_factors_are_the_flow_of_x_t():
    model = _model("data")
    dist = model.distribution(GRID)
    traj = torch.randn(7, 4, 2, dtype=torch.float64)
    prior, factors = dist.log_prob_factors(traj)
    for k in range(1, 4):
        x_t, x_s = traj[:, k], traj[:, k - 1]
        t, s = (
            torch.full((7,), float(GRID[k]), dtype=torch.float64),
            torch.full((7,), float(GRID[k - 1]), dtype=torch.float64),
        )
        mu, sigma = model.predictor(x_t, t, s)  # reads x_t, never f_T(x_t, t)
        u_s, ladj = model.transporter(x_s, s)
        by_hand = Independent(Normal(mu, sigma), 1).log_prob(u_s) + ladj
        torch.testing.assert_close(factors[:, k - 1], by_hand)
        torch.testing.assert_close(dist.pair_log_prob(traj, torch.tensor(k)), by_hand)
        torch.testing.assert_close(dist.step(k, x_t).log_prob(x_s), by_hand)
    torch.testing.assert_close(dist.log_prob(traj), prior + factors.sum(-1))
    # reading u_t instead changes every factor below the top one
    other = _model("transported").distribution(GRID).log_prob_factors(traj)[1]
    assert not torch.allclose(other[:, :2], factors[:, :2])
    torch.testing.assert_close(other[:, 2], factors[:, 2])


def test_data_space_sampling_inverts_each_level_and_matches_its_density():
    model = _model("data")
    dist = model.distribution(GRID)
    g = torch.Generator().manual_seed(3)
    traj, log_p = dist.rsample_and_log_prob((9,), generator=g)
    torch.testing.assert_close(log_p, dist.log_prob(traj))
    # the same draws through the step flows (pyro's path) give the same trajectory
    latents, z = dist.rsample_latents((9,), generator=torch.Generator().manual_seed(3))
    noise = torch.cat([z, latents[:, 3:]], dim=1)
    torch.testing.assert_close(trajectory_from_noise(dist, noise), traj)
    torch.testing.assert_close(dist.rsample((9,), generator=torch.Generator().manual_seed(3)), traj)


def test_input_spaces_agree_while_the_transporter_is_the_identity():
    a = _model("data", randomise_transporter=False).distribution(GRID)
    b = _model("transported", randomise_transporter=False).distribution(GRID)
    traj = torch.randn(5, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(a.log_prob(traj), b.log_prob(traj))
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(a.sample((6,), generator=ga), b.sample((6,), generator=gb))


def test_transported_input_leaves_the_chain_to_the_predictor():
    """The sampling chain of a transported-space predictor runs in u-space: with the predictor fixed, changing the
    transporter changes no latent, only their final inversion; a data-space predictor's chain changes with it."""
    for space, same in (("transported", True), ("data", False)):
        before = _model(space, randomise_transporter=False)
        after = _model(space, randomise_transporter=True)  # the same predictor (same seed), another transporter
        u0 = before.distribution(GRID).rsample_latents((8,), generator=torch.Generator().manual_seed(5))[0]
        u1 = after.distribution(GRID).rsample_latents((8,), generator=torch.Generator().manual_seed(5))[0]
        assert torch.allclose(u0, u1) is same, space
    x = after.distribution(GRID).sample((8,), generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(x[:, 1:3], u1[:, 1:3])  # data space: each level is the inverse of its latent


def test_input_space_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"input_space: expected one of \('transported', 'data'\), got 'x'"):
        FlowMatchingPredictor(MLPVelocity(features=2, width=8), input_space="x")
    model = _model("data")  # float64: from_pretrained brings it back in its saved dtype
    bad = _model("data")
    bad.predictor.input_space = "x"  # a predictor of the user's own with a wrong attribute: refused at the edge
    with pytest.raises(ValueError, match=r"predictor.input_space: expected one of .*, got 'x'"):
        bad.distribution(GRID)
    again = NTM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert again.predictor.input_space == "data"
    traj = torch.randn(3, 4, 2, dtype=torch.float64)
    assert torch.equal(again.distribution(GRID).log_prob(traj), model.distribution(GRID).log_prob(traj))
