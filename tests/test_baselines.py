"""The density baselines of ``trajflow.baselines``: the single flow (TarFlow), the Gaussian-step model and the
per-pixel categoricals, against brute-force and hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trajflow.baselines import (
    PixelCategorical,
    SingleFlow,
    SingleFlowNLL,
    gaussian_step_model,
    matched_single_flow,
    pixel_categorical_bits_per_dim,
)
from trajflow.likelihood import dequantize
from trajflow.nn import count_parameters
from trajflow.predictors import MLPPredictor
from trajflow.transporters import IdentityTransporter, ZukoTransporter
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig


def tiny_flow(t: float = 0.0) -> SingleFlow:
    """A 2-block TarFlow on 1x2x2 images (4 one-pixel tokens), its weights perturbed so that it is far from
    the identity it starts as."""
    config = TransformerTransporterConfig((1, 2, 2), patch_size=1, width=16, heads=1, blocks=2, layers_per_block=1)
    flow = SingleFlow(TransformerTransporter(config), t=t)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("t", [0.0, 0.7])
def test_single_flow_log_prob_is_the_change_of_variables_with_a_brute_force_jacobian(t):
    flow = tiny_flow(t)
    y = torch.randn(3, 1, 2, 2)
    logp = flow.log_prob(y).detach()
    assert logp.shape == (3,)
    for i in range(3):
        f = lambda v: flow.transporter(v.reshape(1, 1, 2, 2), torch.full((1,), t))[0].reshape(4)  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, y[i].reshape(4))  # (4, 4)
        u = f(y[i].reshape(4)).detach()
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum() + torch.linalg.slogdet(jac).logabsdet
        assert abs(float(jac.det()) - 1.0) > 1e-2  # the map is not volume-preserving: the test has teeth
        assert float(logp[i]) == pytest.approx(float(expected), abs=1e-4)


def test_single_flow_sample_is_the_inverse_of_the_base_draw():
    flow = tiny_flow()
    x = flow.sample((5,), generator=torch.Generator().manual_seed(3))
    u = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    back, _ = flow.transporter(x, torch.zeros(5))
    assert torch.allclose(back, u, atol=1e-4)


def test_single_flow_nll_and_bits_per_dim():
    flow = tiny_flow()
    y = torch.rand(6, 1, 2, 2) * 2 - 1
    with torch.no_grad():
        assert float(SingleFlowNLL()(flow, y)) == pytest.approx(float(-flow.log_prob(y).mean() / 4), rel=1e-6)
    x = torch.randint(0, 17, (6, 1, 2, 2), dtype=torch.uint8)
    bpd = flow.bits_per_dim(x, 17, num_samples=2, batch_size=4, generator=torch.Generator().manual_seed(0))
    # by hand: chunks of 4 and 2 images, two dequantisations each, in the order the generator is used
    gen, expected = torch.Generator().manual_seed(0), []
    for chunk in (x[:4], x[4:]):
        draws = [flow.log_prob(dequantize(chunk, 17, gen)).double() for _ in range(2)]
        expected.append(torch.stack([-lp / (4 * math.log(2)) + math.log2(17 / 2) for lp in draws]).mean(0))
    assert bpd.shape == (6,) and bpd.dtype == torch.float64
    assert torch.allclose(bpd, torch.cat(expected), atol=1e-6)


def test_single_flow_rejects_bad_input():
    with pytest.raises(ValueError, match="t: expected a time in"):
        SingleFlow(ZukoTransporter(features=2), t=1.5)
    with pytest.raises(ValueError, match="transporter: expected a trajflow Transporter"):
        SingleFlow(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="y: expected trailing shape"):
        SingleFlow(ZukoTransporter(features=2)).log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch_size"):
        tiny_flow().bits_per_dim(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), 4, batch_size=0)


def test_matched_single_flow_is_the_closest_candidate_within_tolerance():
    base = TransformerTransporterConfig((1, 4, 4), patch_size=2, width=32, heads=2, blocks=2, layers_per_block=1)
    target = 3 * count_parameters(TransformerTransporter(base))
    matched = matched_single_flow(base, target, blocks=range(1, 7), layers_per_block=range(1, 4))
    n = count_parameters(TransformerTransporter(matched))
    assert abs(n - target) / target <= 0.1
    assert (matched.width, matched.heads, matched.patch_size) == (base.width, base.heads, base.patch_size)
    misses = [
        abs(count_parameters(TransformerTransporter(TransformerTransporterConfig(
            (1, 4, 4), patch_size=2, width=32, heads=2, blocks=b, layers_per_block=k))) - target)
        for b, k in itertools.product(range(1, 7), range(1, 4))
    ]  # fmt: skip
    assert abs(n - target) == min(misses)
    with pytest.raises(ValueError, match="target: no stack within 10%"):
        matched_single_flow(base, 10)
    with pytest.raises(ValueError, match="target: expected a positive number"):
        matched_single_flow(base, 0)


def test_gaussian_step_model_is_an_ntm_with_the_identity_transporter():
    predictor = MLPPredictor(features=3)
    model = gaussian_step_model(predictor)
    assert isinstance(model.transporter, IdentityTransporter) and model.predictor is predictor
    assert model.event_shape == (3,)
    with pytest.raises(ValueError, match="predictor: expected a trajflow Predictor"):
        gaussian_step_model(torch.nn.Linear(3, 3))


def test_pixel_categorical_by_hand():
    # three 1x1x2 images, 3 levels: pixel 0 sees 0, 0, 1; pixel 1 sees 2, 2, 2
    train = torch.tensor([[[[0, 2]]], [[[0, 2]]], [[[1, 2]]]], dtype=torch.uint8)
    model = PixelCategorical.fit(train, levels=3, alpha=0.5)
    assert torch.allclose(model.probs[0, 0, 0], torch.tensor([2.5, 1.5, 0.5], dtype=torch.float64) / 4.5)
    assert torch.allclose(model.probs[0, 0, 1], torch.tensor([0.5, 0.5, 3.5], dtype=torch.float64) / 4.5)
    test = torch.tensor([[[[1, 0]]], [[[0, 2]]]], dtype=torch.uint8)
    expected = [
        -(math.log2(1.5 / 4.5) + math.log2(0.5 / 4.5)) / 2,
        -(math.log2(2.5 / 4.5) + math.log2(3.5 / 4.5)) / 2,
    ]
    assert pixel_categorical_bits_per_dim(train, test, 3).tolist() == pytest.approx(expected, abs=1e-12)
    assert model.num_free_parameters == 2 * 2
    # a distribution: the probabilities of all 9 images sum to 1
    every = torch.tensor(list(itertools.product(range(3), repeat=2))).reshape(9, 1, 1, 2)
    assert float(model.log_prob(every).exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_pixel_categorical_samples_follow_the_histograms():
    torch.manual_seed(0)
    model = PixelCategorical(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.0, 0.5]], dtype=torch.float64))
    draws = model.sample((20_000,))
    assert draws.shape == (20_000, 2)
    freq = torch.stack([torch.bincount(draws[:, d], minlength=3) for d in range(2)]).double() / 20_000
    assert torch.allclose(freq, model.probs, atol=0.015)


def test_pixel_categorical_rejects_bad_input():
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="alpha: expected a positive"):
        PixelCategorical.fit(x, 2, alpha=0.0)
    with pytest.raises(ValueError, match="images"):
        PixelCategorical.fit(x + 2, 2)
    with pytest.raises(ValueError, match="test: expected shape"):
        pixel_categorical_bits_per_dim(x, torch.zeros(4, 1, 2, 3, dtype=torch.uint8), 2)
