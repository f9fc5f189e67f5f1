"""Tests of the full-attention image predictor, its backbone and the flow-matching velocity model."""

from __future__ import annotations

import pytest
import torch

from trajflow import NTM, time_grid
from trajflow.baselines.flow_matching import FlowMatchingLoss
from trajflow.conditioning import check_cond, check_drop_cond
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.transporters import IdentityTransporter
from trajflow.velocity import TransformerVelocity

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SHAPE = (2, 4, 4)
TEXT = 6


def config(kind: str, patch: int = 2, **kwargs: object) -> TransformerPredictorConfig:
    cond = {"class": {"num_classes": 3}, "text": {"text_features": TEXT}, "none": {}}[kind]
    base = dict(width=16, depth=2, heads=2, time_features=8)
    base.update(cond)
    base.update(kwargs)
    return TransformerPredictorConfig(SHAPE, patch, **base)


def perturb(model: torch.nn.Module, std: float = 0.2) -> None:
    """Replace the zero head by a small random one so that outputs depend on the inputs."""
    torch.nn.init.normal_(model.head.weight, std=std)
    torch.nn.init.normal_(model.head.bias, std=std)


def text_cond(n: int, length: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, length, TEXT, generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]  # (N, L) True for real tokens
    return features, mask


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 0.5 + 0.5
    return torch.randn(n, *SHAPE, generator=g), t, t - 0.25


def cond_for(kind: str, n: int, seed: int = 0) -> object:
    if kind == "class":
        return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
    if kind == "text":
        return text_cond(n, seed=seed)
    return None


@pytest.mark.parametrize("kind", ["class", "text", "none"])
@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_and_identity_at_init(kind: str, patch: int) -> None:
    torch.manual_seed(0)
    pred = TransformerPredictor(config(kind, patch))
    u, t, s = inputs(3)
    cond = cond_for(kind, 3)
    mu, sigma = pred(u, t, s, cond)
    assert mu.shape == sigma.shape == u.shape
    assert mu.dtype == sigma.dtype == torch.float32
    assert torch.equal(mu, u) and torch.equal(sigma, torch.ones_like(u))
    h = pred.hidden(u, t, s, cond)
    assert h.shape == (3, pred.config.num_tokens, 16)


@settings(deadline=None, max_examples=4, derandomize=True)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["class", "text"]))
def test_null_condition(seed: int, kind: str) -> None:
    """drop_cond rows equal cond=None rows; kept rows depend on cond."""
    torch.manual_seed(seed)
    pred = TransformerPredictor(config(kind))
    perturb(pred)
    u, t, s = inputs(4, seed)
    cond = cond_for(kind, 4, seed)
    drop = torch.tensor([True, False, True, False])
    mu_null, sigma_null = pred(u, t, s, None)
    mu_drop, sigma_drop = pred(u, t, s, cond, drop)
    mu_cond, sigma_cond = pred(u, t, s, cond)
    torch.testing.assert_close(mu_drop[drop], mu_null[drop], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma_drop[drop], sigma_null[drop], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu_drop[~drop], mu_cond[~drop], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mu_cond, mu_null, atol=1e-4)
    mu_all, _ = pred(u, t, s, cond, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(mu_all, mu_null, rtol=1e-5, atol=1e-5)


def test_depends_on_times_and_class() -> None:
    torch.manual_seed(1)
    pred = TransformerPredictor(config("class"))
    perturb(pred)
    u = torch.randn(1, *SHAPE).expand(2, *SHAPE)
    mu, sigma = pred(u, torch.tensor([0.9, 0.9]), torch.tensor([0.5, 0.2]), torch.tensor([1, 1]))
    assert not torch.allclose(mu[0], mu[1]) and not torch.allclose(sigma[0], sigma[1])
    mu, _ = pred(u, torch.tensor([0.9, 0.9]), torch.tensor([0.5, 0.5]), torch.tensor([0, 2]))
    assert not torch.allclose(mu[0], mu[1])


def test_text_padding_is_ignored() -> None:
    torch.manual_seed(2)
    pred = TransformerPredictor(config("text"))
    perturb(pred)
    u, t, s = inputs(2)
    features = torch.randn(2, 5, TEXT)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    mu, sigma = pred(u, t, s, (features, mask))
    noisy = torch.where(mask[..., None], features, torch.full_like(features, float("nan")))
    noisy.requires_grad_(True)
    mu2, sigma2 = pred(u, t, s, (noisy, mask))
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(sigma2, sigma)
    (mu2.sum() + sigma2.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in pred.parameters() if p.grad is not None)
    # Fewer padded tokens: the same output (prefix positions do not depend on the padding length).
    mu3, _ = pred(u[:1], t[:1], s[:1], (features[:1, :2], mask[:1, :2]))
    torch.testing.assert_close(mu3, mu[:1], rtol=1e-5, atol=1e-5)
    # Changing a real token changes the output.
    changed = features.clone()
    changed[0, 0] += 1.0
    mu4, _ = pred(u, t, s, (changed, mask))
    assert not torch.allclose(mu4[0], mu[0])
    # Integer masks (as tokenizers return) are accepted.
    mu5, _ = pred(u, t, s, (features, mask.long()))
    torch.testing.assert_close(mu5, mu)


def test_positions_matter() -> None:
    """2-D RoPE breaks permutation equivariance: shuffling the patches is not just shuffling the output."""
    torch.manual_seed(3)
    pred = TransformerPredictor(config("none", patch=1))
    perturb(pred)
    u, t, s = inputs(1)
    mu, _ = pred(u, t, s)
    mu_t, _ = pred(u.transpose(-1, -2), t, s)
    assert not torch.allclose(mu_t.transpose(-1, -2), mu, atol=1e-4)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_bf16_autocast(kind: str) -> None:
    torch.manual_seed(4)
    pred = TransformerPredictor(config(kind, kv_heads=1))
    perturb(pred, 0.05)
    u, t, s = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, sigma = pred(u, t, s, cond_for(kind, 2), torch.tensor([True, False]))
    assert mu.dtype == sigma.dtype == torch.float32
    assert torch.isfinite(mu).all() and (sigma > 0).all()
    mu32, sigma32 = pred(u, t, s, cond_for(kind, 2), torch.tensor([True, False]))
    torch.testing.assert_close(mu, mu32, rtol=0.05, atol=0.05)


def test_velocity_model() -> None:
    torch.manual_seed(5)
    vel = TransformerVelocity(config("class"))
    x, t, _ = inputs(3)
    v, h = vel(x, t, torch.tensor([0, 1, 2]))
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(x))
    assert h.shape == (3, 4, 16)
    perturb(vel)
    v_null, _ = vel(x, t)
    v_drop, _ = vel(x, t, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(v_drop, v_null, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"cond: expected class indices in \[0, 2\]"):  # at the loss's edge
        FlowMatchingLoss()(vel, x, torch.tensor([0, 1, 3]))


def test_gradients_reach_the_backbone() -> None:
    torch.manual_seed(6)
    pred = TransformerPredictor(config("text"))
    u, t, s = inputs(2)
    mu, sigma = pred(u, t, s, text_cond(2))
    (mu.square().sum() + sigma.log().sum()).backward()
    assert pred.head.weight.grad is not None and pred.head.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs() -> None:
    pred = TransformerPredictor(config("class"))
    u, t, s = inputs(2)
    with pytest.raises(ValueError, match=r"u_t: expected images of size 4x4, got 4x6"):
        pred(torch.randn(2, 2, 4, 6), t, s)
    with pytest.raises(ValueError, match=r"u_t: expected 2 channels"):
        pred(torch.randn(2, 3, 4, 4), t, s)
    with pytest.raises(ValueError, match=r"u_t: expected images of shape \(N, C, H, W\)"):
        pred(torch.randn(1, 2, *SHAPE), t, s)
    with pytest.raises(ValueError, match=r"s: expected shape \(2,\)"):
        pred(u, t, s[:1])
    with pytest.raises(ValueError, match=r"t: expected times in"):
        pred(u, t + 1.0, s)
    # the condition is checked where it enters (check_cond, which the distribution and the losses call)
    with pytest.raises(ValueError, match=r"cond: expected integer class indices"):
        check_cond(pred, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"cond: expected class indices in \[0, 2\], got values in \[-1, 1"):
        check_cond(pred, torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match=r"cond: expected batch shape \(2,\)"):
        check_cond(pred, torch.tensor([0, 1, 2]), (2,))
    with pytest.raises(ValueError, match=r"drop_cond: expected a bool tensor of shape \(2,\)"):
        check_drop_cond(torch.tensor([1, 0]), (2,))


def test_bad_text_cond() -> None:
    pred = TransformerPredictor(config("text"))
    u, t, s = inputs(2)
    features, mask = text_cond(2)
    with pytest.raises(ValueError, match=r"cond: expected text features \(\*batch, L, 6\), got shape \(2, 4, 5\)"):
        check_cond(pred, (torch.randn(2, 4, 5), mask))
    with pytest.raises(ValueError, match=r"cond: expected a mask of shape \(2, 4\) matching the text features"):
        check_cond(pred, (features, mask[:, :3]))
    with pytest.raises(ValueError, match=r"cond: expected a tuple \(text features .*got a single tensor"):
        check_cond(pred, features)
    with pytest.raises(ValueError, match=r"cond: expected a bool"):
        check_cond(pred, (features, mask.float()))
    with pytest.raises(ValueError, match=r"cond: TransformerPredictor is unconditional, expected cond=None"):
        check_cond(TransformerPredictor(config("none")), torch.tensor([0, 1]))
    # and at the edge: a distribution on this predictor refuses the same condition
    model = NTM(IdentityTransporter(SHAPE), pred)
    with pytest.raises(ValueError, match=r"cond: expected text features \(\*batch, L, 6\)"):
        model.distribution(time_grid(2), (torch.randn(2, 4, 5), mask))


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="num_classes, text_features: expected at most one"):
        config("class", text_features=4)
    with pytest.raises(ValueError, match="patch_size: expected a positive divisor"):
        config("none", patch=3)
