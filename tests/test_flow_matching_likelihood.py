r"""The probability-flow log-density of a flow-matching model (trajflow.baselines.flow_matching_log_prob).

The anchor is Gaussian data :math:`x_0 \sim \mathcal{N}(m, \Sigma)`. With :math:`x_t = (1 - t) x_0 + t \epsilon`,
:math:`x_t \sim \mathcal{N}((1 - t) m, \Sigma_t)`, :math:`\Sigma_t = (1 - t)^2 \Sigma + t^2 I`, and the exact
flow-matching velocity is the Gaussian regression of :math:`\epsilon - x_0` on :math:`x_t`:

.. math:: v(x, t) = \mathbb{E}[\epsilon - x_0 | x_t = x] = -m + C_t \Sigma_t^{-1} (x - (1 - t) m),
          \qquad C_t = \text{Cov}(\epsilon - x_0, x_t) = t I - (1 - t) \Sigma,

affine in :math:`x` with a non-diagonal Jacobian (so the exact divergence must take the trace, not a sum of
rows). Its ODE carries :math:`\mathcal{N}(0, I)` at :math:`t = 1` onto the data's law, so the model's
log-density at :math:`t_{\min}` is that of :math:`\mathcal{N}((1 - t_{\min}) m, \Sigma_{t_{\min}})`.
"""

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from trajflow.baselines import flow_matching_bits_per_dim, flow_matching_log_prob
from trajflow.likelihood import bits_per_dim, dequantize
from trajflow.velocity import MLPVelocity, VelocityModel

D = 3


class GaussianVelocity(VelocityModel):
    """The exact flow-matching velocity of N(m, Sigma) data (float64)."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        self.event_shape = torch.Size(mean.shape)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)

    def marginal(self, t: float) -> MultivariateNormal:
        eye = torch.eye(len(self.mean), dtype=self.cov.dtype)
        return MultivariateNormal((1 - t) * self.mean, (1 - t) ** 2 * self.cov + t**2 * eye)

    def forward(self, x_t, t, cond=None, drop_cond=None):
        eye = torch.eye(len(self.mean), dtype=self.cov.dtype)
        tb = t[:, None, None]  # (N, 1, 1)
        cov_t = (1 - tb) ** 2 * self.cov + tb**2 * eye  # (N, D, D)
        c_t = tb * eye - (1 - tb) * self.cov  # (N, D, D), commutes with cov_t
        centred = x_t - (1 - t[:, None]) * self.mean  # (N, D)
        v = -self.mean + (c_t @ torch.linalg.solve(cov_t, centred[..., None]))[..., 0]
        return v, v


@pytest.fixture
def gaussian() -> GaussianVelocity:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = 0.3 * a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)  # correlated, variances < 1
    mean = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    return GaussianVelocity(mean, cov)


@pytest.mark.parametrize("t_min", [0.0, 0.3])
@pytest.mark.parametrize("solver,steps,tol", [("heun", 64, 4e-3), ("rk4", 16, 1e-4), ("euler", 256, 0.1)])
def test_gaussian_log_prob_is_exact(gaussian, t_min, solver, steps, tol):
    x = gaussian.marginal(t_min).sample((16,))
    expected = gaussian.marginal(t_min).log_prob(x)
    with torch.no_grad():  # the divergence takes its own gradients
        got = flow_matching_log_prob(gaussian, x, steps=steps, t_min=t_min, solver=solver)
    assert got.dtype == torch.float64 and got.shape == (16,) and not got.requires_grad
    assert (got - expected).abs().max() < tol


def test_higher_order_solvers_converge_faster(gaussian):
    x = gaussian.marginal(0.0).sample((16,))
    expected = gaussian.marginal(0.0).log_prob(x)

    def err(solver: str, steps: int) -> float:
        return float((flow_matching_log_prob(gaussian, x, steps=steps, solver=solver) - expected).abs().max())

    assert err("heun", 32) < err("heun", 8) / 8  # second order: 16x in theory
    assert err("rk4", 16) < err("rk4", 4) / 30  # fourth order: 256x in theory
    assert err("rk4", 8) < err("heun", 8)


def test_hutchinson_is_unbiased(gaussian):
    # K copies of one point, each with its own probe: their mean is an estimate of the exact-divergence value.
    k = 2000
    x = gaussian.marginal(0.0).sample((1,)).expand(k, D)
    exact = flow_matching_log_prob(gaussian, x[:1], steps=8, solver="rk4")
    g = torch.Generator().manual_seed(0)
    estimates = flow_matching_log_prob(gaussian, x, steps=8, solver="rk4", divergence="hutchinson", generator=g)
    std = float(estimates.std())
    assert std > 1e-3  # the Jacobian is not diagonal: single-probe estimates do vary
    assert abs(float(estimates.mean() - exact)) < 5 * std / math.sqrt(k)
    # More probes per example, lower variance; the same generator seed, the same estimates.
    many = flow_matching_log_prob(
        gaussian, x[:200], steps=8, solver="rk4", divergence="hutchinson", probes=16, generator=g
    )
    assert float(many.std()) < std / 2
    again = flow_matching_log_prob(
        gaussian, x, steps=8, solver="rk4", divergence="hutchinson", generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again, estimates)


def test_hutchinson_on_a_network_matches_exact_in_mean():
    torch.manual_seed(0)
    model = MLPVelocity(features=4, width=32, depth=1).eval()
    x = torch.randn(1, 4).expand(1000, 4)
    exact = flow_matching_log_prob(model, x[:1], steps=4)
    estimates = flow_matching_log_prob(
        model, x, steps=4, divergence="hutchinson", generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(estimates.mean() - exact)) < 5 * float(estimates.std()) / math.sqrt(1000) + 1e-5


def test_bits_per_dim_is_the_dequantised_log_prob(gaussian):
    x_int = torch.randint(0, 17, (5, D))
    got = flow_matching_bits_per_dim(
        gaussian, x_int, 17, num_samples=2, steps=4, solver="rk4", generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    expected = 0.0
    for _ in range(2):
        y = dequantize(x_int, 17, g, dtype=torch.float64)
        expected = expected + bits_per_dim(flow_matching_log_prob(gaussian, y, steps=4, solver="rk4"), D, 17)
    assert torch.allclose(got, expected / 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"t_min": 1.0}, "t_min"),
        ({"t_min": -0.1}, "t_min"),
        ({"solver": "dopri5"}, "solver"),
        ({"divergence": "skilling"}, "divergence"),
        ({"probes": 0}, "probes"),
    ],
)
def test_bad_arguments_are_named(gaussian, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        flow_matching_log_prob(gaussian, torch.zeros(2, D, dtype=torch.float64), **kwargs)


def test_bad_points_are_named(gaussian):
    with pytest.raises(ValueError, match=r"^x0: expected trailing shape \(3,\)"):
        flow_matching_log_prob(gaussian, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^x0: expected a floating-point tensor of shape \(N, \*\(3,\)\)"):
        flow_matching_log_prob(gaussian, torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="^x0: expected finite values"):
        flow_matching_log_prob(gaussian, torch.full((2, 3), math.nan))
    with pytest.raises(ValueError, match="^x_int: expected integer values"):
        flow_matching_bits_per_dim(gaussian, torch.full((2, 3), 0.5), 17)
    with pytest.raises(ValueError, match="^x_int: expected trailing shape"):
        flow_matching_bits_per_dim(gaussian, torch.zeros(2, 4, dtype=torch.long), 17)
