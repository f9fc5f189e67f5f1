"""Tests of the condition-aware transformer transporter f_T(x, t, y) (issue 8) and its plumbing."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec

import pytest
import torch

import trajflow
from trajflow.conditioning import check_cond, check_drop_cond
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.transporters import IdentityTransporter, NflowsTransporter, ZukoTransporter
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(deadline=None, max_examples=5, derandomize=True)
SHAPE = (1, 4, 4)
TEXT = 3  # text feature width
CLASSES = 4
SMALL = dict(width=16, heads=2, layers_per_block=1, blocks=2, time_features=8)


def make(kind: str | None, *, seed: int = 0, perturb: float = 0.2, dtype=torch.float64) -> TransformerTransporter:
    """A tiny (conditional) transporter; its zero-initialised heads and condition projections are perturbed
    so that the map is neither the identity nor independent of the condition."""
    torch.manual_seed(seed)
    extra = {"text": {"text_features": TEXT}, "class": {"num_classes": CLASSES}, None: {}}[kind]
    f = TransformerTransporter(TransformerTransporterConfig(SHAPE, 2, **SMALL, **extra))
    if perturb:
        for block in f.blocks:
            torch.nn.init.normal_(block.head.weight, std=perturb)
            torch.nn.init.normal_(block.head.bias, std=perturb)
            if kind is not None:
                torch.nn.init.normal_(block.cond_proj.weight, std=1.0)
    return f.to(dtype)


def random_cond(kind: str, n: int, seed: int, length: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if kind == "class":
        return torch.randint(0, CLASSES, (n,), generator=g)
    features = torch.randn(n, length, TEXT, generator=g, dtype=dtype)
    mask = torch.rand(n, length, generator=g) < 0.7
    mask[:, 0] = True  # at least one real token
    return features, mask


def cond_index(cond, idx):
    return cond[idx] if isinstance(cond, torch.Tensor) else tuple(c[idx] for c in cond)


# ------------------------------------------------------------------------------------- the transporter alone


@SETTINGS
@given(
    kind=st.sampled_from(["text", "class"]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    dropped=st.booleans(),
)
def test_inverse_of_forward_every_method(kind: str, n: int, seed: int, dropped: bool) -> None:
    f = make(kind, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    cond = random_cond(kind, n, seed)
    drop = (torch.rand(n, generator=g) < 0.5) if dropped else None
    u, ladj = f(x, t, cond, drop)
    assert u.shape == x.shape and ladj.shape == (n,)
    assert not torch.allclose(u, x)
    for method in ("kv-cache", "naive", "static"):
        with torch.no_grad():
            back = f.inverse(u, t, cond, drop, method=method)
        torch.testing.assert_close(back, x, atol=1e-9, rtol=1e-9, msg=f"method={method}")
    # Through the torch Transform, with a sample dim on the left of the batch.
    T = f.transform(t, cond, drop)
    xs = torch.randn(2, n, *SHAPE, generator=g, dtype=torch.float64)
    us = T(xs)
    torch.testing.assert_close(T.inv(us), xs, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(T.log_abs_det_jacobian(xs, us)[1], f(xs[1], t, cond, drop)[1])


@SETTINGS
@given(kind=st.sampled_from(["text", "class"]), seed=st.integers(0, 2**16))
def test_log_det_equals_autograd_jacobian(kind: str, seed: int) -> None:
    f = make(kind, seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.rand(1, generator=g, dtype=torch.float64)
    cond = random_cond(kind, 1, seed)
    _, ladj = f(x, t, cond)
    jac = torch.autograd.functional.jacobian(lambda v: f(v.reshape(1, *SHAPE), t, cond)[0].reshape(-1), x.reshape(-1))
    _, logdet = torch.linalg.slogdet(jac)
    torch.testing.assert_close(ladj[0], logdet, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_starts_as_identity_and_condition_changes_the_map(kind: str) -> None:
    torch.manual_seed(0)
    f0 = make(kind, perturb=0.0)
    x, t = torch.randn(4, *SHAPE, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    u0, l0 = f0(x, t, random_cond(kind, 4, 1))
    assert torch.equal(u0, x) and bool((l0 == 0).all())
    f = make(kind)
    ua, _ = f(x, t, random_cond(kind, 4, 1))
    ub, _ = f(x, t, random_cond(kind, 4, 2))
    assert not torch.allclose(ua, ub)
    if kind == "text":  # padded tokens do not matter: change them (even to NaN)
        features, mask = random_cond(kind, 4, 1)
        features = torch.where(mask[..., None], features, torch.nan)
        torch.testing.assert_close(f(x, t, (features, mask))[0], ua)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_dropped_condition_is_the_null_context(kind: str) -> None:
    f = make(kind)
    x, t = torch.randn(3, *SHAPE, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    all_drop = torch.ones(3, dtype=torch.bool)
    null, null_ladj = f(x, t, None, all_drop)
    ua, la = f(x, t, random_cond(kind, 3, 1), all_drop)
    ub, _ = f(x, t, random_cond(kind, 3, 2), all_drop)
    torch.testing.assert_close(ua, null)
    torch.testing.assert_close(ub, null)
    torch.testing.assert_close(la, null_ladj)
    # The null context is exactly the unconditional transporter with the same block weights.
    g = make(None)
    missing, unexpected = g.load_state_dict(f.state_dict(), strict=False)
    assert not missing and all("cond" in k or k.startswith("condition.") for k in unexpected)
    torch.testing.assert_close(g(x, t)[0], null)
    # A partial mask drops only its examples.
    drop = torch.tensor([True, False, True])
    cond = random_cond(kind, 3, 1)
    u, _ = f(x, t, cond, drop)
    torch.testing.assert_close(u[drop], null[drop])
    torch.testing.assert_close(u[~drop], f(x, t, cond)[0][~drop])
    with torch.no_grad():
        torch.testing.assert_close(f.inverse(null, t, None, all_drop, method="static"), x)


def test_unconditional_config_has_the_old_parameters() -> None:
    for extra in ({}, {"text_features": 0}, {"text_features": None, "num_classes": None}):
        torch.manual_seed(0)
        f = TransformerTransporter(TransformerTransporterConfig(SHAPE, 2, **SMALL, **extra))
        sd = f.state_dict()
        # Keys and size of the transporter before conditioning existed (same config).
        assert len(sd) == 44 and sum(v.numel() for v in sd.values()) == 7888
        assert hashlib.sha1(",".join(sorted(sd)).encode()).hexdigest() == "ebb935d944764c60c7504f9ef02bd2877afcc803"
        assert not f.is_conditional and f.cond_event_dims is None
    cond = make("text")
    assert cond.is_conditional and cond.cond_event_dims == (2, 1)
    assert make("class").cond_event_dims == 0
    assert any(k.startswith("condition.") for k in cond.state_dict())


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_conditions_raise_clear_errors() -> None:
    """The transporter trusts its callers; the edges check its condition with check_cond (its cond_spec)."""
    f = make("text")
    features, mask = random_cond("text", 2, 0)
    with pytest.raises(ValueError, match=r"cond: expected text features \(\*batch, L, 3\), got shape \(2, 3, 5\)"):
        check_cond(f, (torch.randn(2, 3, 5, dtype=torch.float64), mask))
    with pytest.raises(ValueError, match=r"cond: expected batch shape \(2,\).*got \(3,\)"):
        check_cond(f, (torch.randn(3, 3, TEXT, dtype=torch.float64), torch.ones(3, 3, dtype=torch.bool)), (2,))
    with pytest.raises(ValueError, match=r"cond: expected a tuple \(text features.*got a single tensor"):
        check_cond(f, features)
    with pytest.raises(ValueError, match=r"cond: expected a mask of shape \(2, 3\).*got \(2, 4\)"):
        check_cond(f, (features, torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"drop_cond: expected a bool tensor of shape \(2,\)"):
        check_drop_cond(torch.ones(3, dtype=torch.bool), (2,))
    assert check_cond(f, None) == ()  # the null context everywhere
    c = make("class")
    with pytest.raises(ValueError, match=r"cond: expected batch shape \(2,\).*got \(3,\)"):
        check_cond(c, torch.zeros(3, dtype=torch.long), (2,))
    with pytest.raises(ValueError, match=r"cond: expected class indices in \[0, 3\]"):
        check_cond(c, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"cond: expected integer class indices"):
        check_cond(c, torch.zeros(2))
    with pytest.raises(ValueError, match=r"cond: TransformerTransporter is unconditional"):
        check_cond(make(None), torch.zeros(2, dtype=torch.long))
    # at the edge: a distribution with the conditional transporter refuses a condition it cannot take
    model = ntm("class")
    grid = trajflow.time_grid(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cond: expected class indices in \[0, 3\]"):
        model.distribution(grid, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="num_classes, text_features"):
        TransformerTransporterConfig(SHAPE, 2, num_classes=2, text_features=3)


@pytest.mark.parametrize(
    "kind",
    [
        "zuko",
        pytest.param(
            "nflows",
            marks=pytest.mark.skipif(
                find_spec("nflows") is None, reason="needs nflows: pip install 'trajflow[nflows]'"
            ),
        ),
    ],
)
def test_other_transporters_and_the_protocol(kind: str) -> None:
    x, t = torch.randn(3, 2), torch.rand(3)
    y = torch.zeros(3, dtype=torch.long)
    u, ladj = IdentityTransporter(2)(x, t, y, torch.ones(3, dtype=torch.bool))  # ignored
    assert torch.equal(u, x) and bool((ladj == 0).all())
    assert not IdentityTransporter(2).is_conditional
    for f in (ZukoTransporter(2) if kind == "zuko" else NflowsTransporter(2, preset="maf"),):
        assert not f.is_conditional
        u, _ = f(x, t, None, torch.ones(3, dtype=torch.bool))  # unconditional: cond and drop_cond are ignored
        torch.testing.assert_close(f(x, t, y)[0], u)
        torch.testing.assert_close(f.inverse(u, t, y), f.inverse(u, t))


# ------------------------------------------------------------------------------------- in the distribution


def ntm(kind: str, dtype: torch.dtype = torch.float64) -> trajflow.NTM:
    f = make(kind, dtype=dtype)
    extra = {"text_features": TEXT} if kind == "text" else {"num_classes": CLASSES}
    torch.manual_seed(1)
    p = TransformerPredictor(TransformerPredictorConfig(SHAPE, 2, width=16, depth=1, heads=2, time_features=8, **extra))
    for m in (p.head,):
        torch.nn.init.normal_(m.weight, std=0.1)
    return trajflow.NTM(f, p.to(dtype))


@pytest.mark.parametrize("kind", ["text", "class"])
def test_log_prob_is_the_sum_of_step_flows(kind: str) -> None:
    model = ntm(kind)
    grid = trajflow.time_grid(3, 0.02, dtype=torch.float64)
    cond = random_cond(kind, 2, 3)
    drop = torch.tensor([False, True])
    dist = model.distribution(grid, cond, drop_cond=drop)
    traj = dist.sample((2,))  # (2, 2, T + 1, *SHAPE)
    assert traj.shape == (2, 2, 4, *SHAPE) and bool(torch.isfinite(traj).all())
    lp = dist.log_prob(traj)
    total = torch.distributions.Normal(0.0, 1.0).log_prob(traj[:, :, -1]).flatten(2).sum(-1)
    for k in range(1, 4):
        total = total + dist.step(k, traj[:, :, k]).log_prob(traj[:, :, k - 1])
    torch.testing.assert_close(lp, total)
    # Pair-wise factors agree with the trajectory factors.
    _, factors = dist.log_prob_factors(traj)
    for k in range(1, 4):
        torch.testing.assert_close(dist.pair_log_prob(traj, torch.tensor(k)), factors[..., k - 1])
    traj2, lp2 = dist.rsample_and_log_prob((1,))
    torch.testing.assert_close(lp2, dist.log_prob(traj2))
    # The condition reaches the transporter: another condition gives another density.
    other = model.distribution(grid, random_cond(kind, 2, 5), drop_cond=drop)
    assert not torch.allclose(other.log_prob(traj)[:, 0], lp[:, 0])
    torch.testing.assert_close(other.log_prob(traj)[:, 1], lp[:, 1])  # dropped: the same null context
    # ... and it is the transporter's doing too: decoding (no predictor) depends on the condition.
    latents, _ = dist.rsample_latents((2,))
    a, b = dist.decode(latents), other.decode(latents)
    assert not torch.allclose(a[:, 0, :-1], b[:, 0, :-1])
    torch.testing.assert_close(a[:, 1], b[:, 1])


@pytest.mark.parametrize("kind", ["text", "class"])
def test_sampling_with_guidance_and_without_condition(kind: str) -> None:
    model = ntm(kind)
    cond = random_cond(kind, 2, 5)
    x = model.sample((3,), cond=cond, grid=trajflow.time_grid(2, dtype=torch.float64), guidance=2.0)
    assert x.shape == (3, 2, *SHAPE) and bool(torch.isfinite(x).all())
    grid = trajflow.time_grid(2, dtype=torch.float64)
    guided, plain = model.distribution(grid, cond, guidance=2.0), model.distribution(grid, cond)
    latents, _ = guided.rsample_latents((2,))
    # The transporter is not guided: decoding the same latents gives the same trajectory.
    torch.testing.assert_close(guided.decode(latents), plain.decode(latents))
    # No condition at all: the null context everywhere.
    uncond = model.distribution(grid)
    traj = uncond.sample((2,))
    assert bool(torch.isfinite(uncond.log_prob(traj)).all())
    null = model.distribution(grid, cond, drop_cond=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(null.decode(latents), uncond.decode(latents))
    elbo = plain.elbo(torch.randn(2, *SHAPE, dtype=torch.float64))
    assert elbo.shape == (2,) and bool(torch.isfinite(elbo).all())


def test_transporter_and_predictor_must_take_the_same_condition() -> None:
    p = TransformerPredictor(TransformerPredictorConfig(SHAPE, 2, width=16, depth=1, heads=2, time_features=8))
    with pytest.raises(ValueError, match="transporter/predictor: the transporter is conditional"):
        trajflow.NTM(make("text"), p.double())
    model = ntm("text")
    bad = (torch.randn(2, 3, TEXT + 1, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cond: expected text features"):
        model.distribution(trajflow.time_grid(2, dtype=torch.float64), bad)


def test_t2i_transporter_condition() -> None:
    from examples.t2i.config import ModelConfig, T2IConfig

    off = T2IConfig()
    assert off.transporter_config((3, 32, 32), 8).text_features is None
    on = T2IConfig(model=ModelConfig(transporter_condition=True))
    tc = on.transporter_config((3, 32, 32), 8)
    assert tc.text_features == 8 and tc.cond_event_dims == (2, 1)
    with pytest.raises(ValueError, match="transporter_condition"):
        on.transporter_config((3, 32, 32))
    with pytest.raises(ValueError, match="model.transporter_condition: only the 'transformer'"):
        ModelConfig(transporter_condition=True, transporter="identity")


def test_identity_check_and_distillation_with_a_conditional_transporter() -> None:
    from trajflow.denoise import DistillationLoss
    from trajflow.finetune import check_identity

    check_identity(make("text", perturb=0.0, dtype=torch.float32))  # zero-init: the identity for any condition
    with pytest.raises(ValueError, match="expected the identity"):
        check_identity(make("text", dtype=torch.float32))
    model = ntm("class", torch.float32)
    gen = torch.Generator().manual_seed(0)
    u0, t0, target, drop = DistillationLoss(model, steps=2, cond_drop=0.5).targets(
        torch.randn(3, *SHAPE), random_cond("class", 3, 0), generator=gen
    )
    assert u0.shape == target.shape == (3, *SHAPE) and bool(torch.isfinite(target).all())
