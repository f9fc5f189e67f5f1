"""Per-level clean estimates of the samplers (the diagnosis of where a few-step sampler decides)."""

from __future__ import annotations

import pytest
import torch

import trajflow
from examples.t2i.evaluation.levels import euler_level_estimates, ntm_level_estimates
from trajflow.predictors import FlowMatchingPredictor
from trajflow.transporters import IdentityTransporter
from trajflow.velocity import MLPVelocity


def _velocity() -> MLPVelocity:
    torch.manual_seed(0)
    v = MLPVelocity(2, num_classes=3, width=32, depth=2)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return v


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_ntm_estimate_of_an_fm_initialised_model_is_the_fm_estimate(guidance):
    velocity = _velocity()
    model = trajflow.NTM(IdentityTransporter(2), FlowMatchingPredictor(velocity, time_features=0))
    noise, cond = torch.randn(16, 2), torch.randint(0, 3, (16,))
    ntm = ntm_level_estimates(model, noise, cond=cond, steps=4, shift=1.5, guidance=guidance)
    fm = euler_level_estimates(velocity, noise, cond=cond, steps=4, shift=1.5, guidance=guidance)
    assert ntm.shape == fm.shape == (4, 16, 2)
    # Same x at t = 1, same velocity (and sigma_c = sigma_u at init, so the Gaussian guidance is linear in v):
    # the first step's estimates agree; later the chains differ.
    torch.testing.assert_close(ntm[0], fm[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ntm[1:], fm[1:])
    assert torch.isfinite(ntm).all()


def test_ntm_level_estimates_checks_the_noise_shape():
    model = trajflow.NTM(IdentityTransporter(2), FlowMatchingPredictor(_velocity()))
    with pytest.raises(ValueError, match=r"noise: expected shape \(N, 2\)"):
        ntm_level_estimates(model, torch.randn(4, 3))
