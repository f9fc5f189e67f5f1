"""Property tests of the vector transporters and of the per-step flow (Hypothesis, float64)."""

from importlib.util import find_spec

import pytest
import torch

import trajflow
from trajflow.transporters import IdentityTransporter, NflowsTransporter, ZukoTransporter

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FEATURES = 3


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Random weights, so that no transform is accidentally near the identity."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _make(kind: str) -> trajflow.transporters.Transporter:
    torch.manual_seed(0)
    f = {
        "zuko-nsf": lambda: ZukoTransporter(FEATURES, preset="nsf", hidden_features=(16, 16)),
        "zuko-maf": lambda: ZukoTransporter(FEATURES, preset="maf", hidden_features=(16, 16)),
        "nflows-maf": lambda: NflowsTransporter(FEATURES, preset="maf", hidden_features=16),
        "nflows-rqs": lambda: NflowsTransporter(FEATURES, preset="rqs", hidden_features=16),
        "identity": lambda: IdentityTransporter(FEATURES),
    }[kind]()
    return _perturb(f).double()


HAVE_NFLOWS = find_spec("nflows") is not None  # an optional extra: its kinds skip where it is missing


def _kinds(*kinds: str) -> list:
    skip = pytest.mark.skipif(not HAVE_NFLOWS, reason="needs nflows: pip install 'trajflow[nflows]'")
    return [pytest.param(k, marks=skip) if k.startswith("nflows") else k for k in kinds]


KINDS = _kinds("zuko-nsf", "zuko-maf", "nflows-maf", "nflows-rqs", "identity")
TRANSPORTERS = {
    k: _make(k)
    for k in ("zuko-nsf", "zuko-maf", "nflows-maf", "nflows-rqs", "identity")
    if HAVE_NFLOWS or not k.startswith("nflows")
}

points = st.lists(st.floats(-3, 3), min_size=FEATURES, max_size=FEATURES).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)
times = st.floats(0.0, 0.999).map(lambda t: torch.tensor(t, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
@given(x=points, t=times)
def test_inverse_of_forward_is_identity(kind, x, t):
    f = TRANSPORTERS[kind]
    u, _ = f(x[None], t[None])
    assert torch.allclose(f.inverse(u, t[None]), x[None], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@given(x=points, t=times)
def test_ladj_equals_autograd_jacobian(kind, x, t):
    f = TRANSPORTERS[kind]
    _, ladj = f(x[None], t[None])
    J = torch.autograd.functional.jacobian(lambda y: f(y[None], t[None])[0][0], x)
    sign, logdet = torch.linalg.slogdet(J)
    assert sign > 0 or kind.startswith("nflows")  # nflows transforms may reverse orientation
    assert torch.allclose(ladj.double(), logdet[None], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@given(x=points, t=times)
def test_forward_and_inverse_ladj_cancel(kind, x, t):
    transform = TRANSPORTERS[kind].transform(t[None])
    u, ladj = transform.call_and_ladj(x[None])
    inv = transform.inv
    ladj_inv = inv.log_abs_det_jacobian(u, inv(u))
    assert torch.allclose(ladj + ladj_inv, torch.zeros(1, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_transform_broadcasts_like_torch(kind):
    f = TRANSPORTERS[kind]
    t = torch.rand(4, dtype=torch.float64)
    transform = f.transform(t)
    assert isinstance(transform, torch.distributions.Transform)
    x = torch.randn(7, 4, FEATURES, dtype=torch.float64)  # (*sample, *batch, *event)
    u, ladj = transform.call_and_ladj(x)
    assert u.shape == x.shape and ladj.shape == (7, 4)
    u_direct, ladj_direct = f(x, t.expand(7, 4))
    assert torch.allclose(u, u_direct) and torch.allclose(ladj.double(), ladj_direct.double())
    assert torch.allclose(transform.inv(u), x, atol=1e-6)


def test_transporter_input_errors():
    f = ZukoTransporter(2)
    with pytest.raises(ValueError, match="t: expected shape"):
        f.check_input("x", torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"x: expected trailing shape \(2,\)"):
        f.check_input("x", torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="preset"):
        ZukoTransporter(2, preset="glow")
    with pytest.raises(ValueError, match="features"):
        ZukoTransporter(0)


def test_nflows_pitfalls_are_rejected():
    pytest.importorskip("nflows")
    from nflows.transforms.linear import NaiveLinear
    from nflows.transforms.normalization import BatchNorm

    with pytest.raises(ValueError, match="NaiveLinear"):
        NflowsTransporter(2, NaiveLinear(2))
    with pytest.raises(ValueError, match="BatchNorm"):
        NflowsTransporter(2, BatchNorm(2))


# -- the per-step flow p(x_{t_{k-1}} | x_{t_k}) --------------------------------------------------------------


def _model(kind: str, **kw) -> trajflow.NTM:
    torch.manual_seed(1)
    predictor = _perturb(trajflow.predictors.MLPPredictor(FEATURES, width=32, depth=2, **kw), 0.1)
    return trajflow.NTM(TRANSPORTERS[kind], predictor.double())


@pytest.mark.parametrize("kind", _kinds("zuko-nsf", "nflows-rqs", "identity"))
@given(x=points, k=st.integers(1, 4))
def test_step_flow_ladj_and_inverse(kind, x, k):
    dist = _model(kind).distribution(trajflow.time_grid(4, 0.05, dtype=torch.float64))
    x_tk = torch.randn(FEATURES, dtype=torch.float64)
    step = dist.step(k, x_tk)
    z, ladj = step.transform.call_and_ladj(x)
    J = torch.autograd.functional.jacobian(lambda y: step.transform(y), x)
    assert torch.allclose(ladj, torch.linalg.slogdet(J)[1], atol=1e-5)
    assert torch.allclose(step.transform.inv(z), x, atol=1e-6)
    # A normalizing flow's density: log N(z) + log|det J|.
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    assert torch.allclose(step.log_prob(x), base + ladj, atol=1e-6)


def test_zuko_transporter_refuses_times_outside_the_unit_interval_and_nan():
    # issue 16, item 9: f(x, t=1.5) and f(x, t=nan) were accepted (NaN out for NaN in)
    f, x = ZukoTransporter(2, hidden_features=(8,)), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\]"):
        f(x, torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(ValueError, match="t: expected finite values"):
        f.inverse(x, torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="t: expected finite values"):
        f.transform(torch.tensor([float("nan")]))
    unchecked = ZukoTransporter(2, hidden_features=(8,), validate_args=False)
    assert unchecked(x, torch.tensor([0.1, 1.5, 0.2]))[0].shape == (3, 2)  # the flag changes checks only


def test_an_unknown_zuko_argument_names_the_trajflow_class_and_the_key():
    # issue 16, item 16: the error named zuko's MaskedMLP
    with pytest.raises(
        ValueError, match=r"kwargs: ZukoTransporter with preset 'nsf' takes no argument\(s\) \['colour'\]"
    ):
        ZukoTransporter(2, colour="red")
    with pytest.raises(ValueError, match=r"kwargs: ZukoTransporter with preset 'maf' .*\['bins'\]"):
        ZukoTransporter(2, preset="maf", bins=4)  # bins is NSF's
    assert ZukoTransporter(2, bins=4, activation=torch.nn.ELU, hidden_features=(8,)).preset_config["bins"] == 4
    with pytest.raises(ValueError, match="hidden_features: expected"):
        ZukoTransporter(2, hidden_features=(8, 0))
    with pytest.raises(ValueError, match="time_features: expected an even integer"):
        ZukoTransporter(2, time_features=3)


def test_an_empty_batch_goes_through_the_zuko_transporter():
    f = ZukoTransporter(2, hidden_features=(8,))
    u, ladj = f(torch.zeros(0, 2), torch.zeros(0))
    assert u.shape == (0, 2) and ladj.shape == (0,)
    assert f.inverse(torch.zeros(0, 2), torch.zeros(0)).shape == (0, 2)
