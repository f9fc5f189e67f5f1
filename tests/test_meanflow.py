"""MeanFlow (trajflow.baselines.meanflow): the loss against flow matching at r = t, the init against the
teacher, the JVP against finite differences and reverse mode, the sampler against one hand-written step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajflow.baselines import FlowMatchingLoss, MeanFlowLoss, MeanFlowVelocity, meanflow_sample
from trajflow.baselines.meanflow import meanflow_jvp
from trajflow.predictors.transformer import TransformerPredictorConfig
from trajflow.velocity import TransformerVelocity


def teacher(text: bool = False, dtype: torch.dtype = torch.float32) -> TransformerVelocity:
    """A tiny class- (or text-) conditional velocity model, its weights perturbed away from the zero head."""
    kind = {"text_features": 6} if text else {"num_classes": 3}
    config = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2, **kind)
    model = TransformerVelocity(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_at_r_equal_t_the_loss_is_flow_matching_with_the_same_draws():
    fm_model = teacher()
    model = MeanFlowVelocity.from_velocity(fm_model)
    x0, cond = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    mf = MeanFlowLoss(ratio_r_neq_t=0.0, time_dist="uniform", adaptive_p=0.0, cond_drop=0.5)
    got = mf(model, x0, cond, generator=torch.Generator().manual_seed(1))
    with sdpa_kernel(SDPBackend.MATH):  # the JVP's attention backend, so that both sum in one order
        want = FlowMatchingLoss(cond_drop=0.5)(fm_model, x0, cond, generator=torch.Generator().manual_seed(1))
    assert float(want) > 0.1
    assert torch.equal(got, want)


def test_the_loss_trains_the_interval_embedding_when_r_differs_from_t():
    model = MeanFlowVelocity.from_velocity(teacher())
    loss = MeanFlowLoss(ratio_r_neq_t=1.0)(model, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.time_mlps[1][-1].weight.grad.abs().sum() > 0  # the zero layer gets a gradient
    assert MeanFlowLoss(ratio_r_neq_t=0.0)(model, torch.randn(4, 1, 4, 4)) != loss


@pytest.mark.parametrize("text", [False, True])
def test_at_init_u_equals_the_teacher_velocity_for_every_r(text):
    fm_model = teacher(text)
    model = MeanFlowVelocity.from_velocity(fm_model)
    z, t = torch.randn(5, 1, 4, 4), torch.rand(5)
    r = t * torch.rand(5)
    cond = (torch.randn(5, 3, 6), torch.ones(5, 3, dtype=torch.bool)) if text else torch.tensor([0, 1, 2, 0, 1])
    v, _ = fm_model(z, t, cond)
    assert v.abs().mean() > 0.1
    assert torch.equal(model(z, r, t, cond), v)
    assert torch.equal(model(z, torch.zeros(5), t, cond), v)
    assert torch.equal(model.velocity(z, t, cond)[0], v)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), fm_model.parameters()))


class TinyAverageVelocity(nn.Module):
    """u(z, r, t) = MLP([z, r, t]) on vectors of 3."""

    event_shape = torch.Size((3,))

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def forward(self, z, r, t, cond=None, drop_cond=None):
        return self.net(torch.cat([z, r[:, None], t[:, None]], dim=-1))


def test_the_jvp_is_the_total_time_derivative_by_finite_differences():
    model = TinyAverageVelocity()
    z, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    r = 0.5 * t
    u, dudt = meanflow_jvp(model, z, r, t, v)
    h = 1e-6
    fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(u, model(z, r, t))
    torch.testing.assert_close(dudt, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("text", [False, True])
def test_the_jvp_runs_through_the_transformer_attention_and_matches_reverse_mode(text):
    model = perturbed(MeanFlowVelocity.from_velocity(teacher(text, torch.float64)))
    z, v = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    cond = (torch.randn(3, 3, 6, dtype=torch.float64), mask) if text else torch.tensor([0, 1, 2])
    u, dudt = meanflow_jvp(model, z, r, t, v, cond)
    with sdpa_kernel(SDPBackend.MATH):  # double backward through the math kernel, for reference
        _, want = torch.autograd.functional.jvp(lambda z_, t_: model(z_, r, t_, cond), (z, t), (v, torch.ones_like(t)))
    assert dudt.abs().mean() > 1e-2
    torch.testing.assert_close(dudt, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(u, model(z, r, t, cond))


def test_one_step_sampling_is_one_average_velocity_step_from_noise():
    model = perturbed(MeanFlowVelocity.from_velocity(teacher()))
    z, cond = torch.randn(3, 1, 4, 4), torch.tensor([2, 0, 1])
    one = meanflow_sample(model, z, 1, cond=cond)
    torch.testing.assert_close(one, z - model(z, torch.zeros(3), torch.ones(3), cond))
    # Two steps on the shifted grid 1 -> shift / (1 + shift) -> 0.
    shift = 3.0
    mid = torch.full((3,), shift * 0.5 / (1 + (shift - 1) * 0.5))
    z_mid = z - (1 - mid[:, None, None, None]) * model(z, mid, torch.ones(3), cond)
    want = z_mid - mid[:, None, None, None] * model(z_mid, torch.zeros(3), mid, cond)
    torch.testing.assert_close(meanflow_sample(model, z, 2, cond=cond, shift=shift), want)


def test_save_and_load_round_trip(tmp_path):
    model = perturbed(MeanFlowVelocity.from_velocity(teacher()))
    again = MeanFlowVelocity.from_pretrained(model.save_pretrained(tmp_path / "mf"))
    z, t = torch.randn(2, 1, 4, 4), torch.rand(2)
    assert torch.equal(again(z, 0.5 * t, t), model(z, 0.5 * t, t))


def test_bad_inputs_name_the_argument():
    model = MeanFlowVelocity.from_velocity(teacher())
    with pytest.raises(ValueError, match=r"^x0: expected trailing shape \(1, 4, 4\)"):
        MeanFlowLoss()(model, torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"^noise: expected trailing shape"):
        meanflow_sample(model, torch.randn(2, 2, 4, 4), 1)
    with pytest.raises(ValueError, match=r"^steps: expected an integer >= 1, got 0"):
        meanflow_sample(model, torch.randn(2, 1, 4, 4), 0)
    with pytest.raises(ValueError, match=r"^r: expected r <= t"):
        model(torch.randn(2, 1, 4, 4), torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.8]))
    with pytest.raises(ValueError, match=r"^velocity: expected a TransformerVelocity, got Linear"):
        MeanFlowVelocity.from_velocity(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^ratio_r_neq_t: expected a fraction in \[0, 1\], got 1.5"):
        MeanFlowLoss(ratio_r_neq_t=1.5)
    with pytest.raises(ValueError, match=r"^time_dist: expected 'logit_normal' or 'uniform'"):
        MeanFlowLoss(time_dist="lognormal")
