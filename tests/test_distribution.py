"""TrajectoryDistribution: exact identities, torch.distributions conventions, bad input, Pyro."""

import math

import pytest
import torch
from torch import Tensor, nn

import trajflow
from trajflow import MarkovInterpolant, time_grid
from trajflow.guidance import guided_gaussian
from trajflow.predictors import MLPPredictor, Predictor
from trajflow.transporters import IdentityTransporter, ZukoTransporter


def _perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.fixture
def model() -> trajflow.NTM:
    torch.manual_seed(0)
    return trajflow.NTM(
        ZukoTransporter(2, hidden_features=(16, 16)),
        _perturb(MLPPredictor(2, num_classes=3, width=32, depth=2)),
    )


class GaussianReverse(Predictor):
    """The exact reverse conditionals p(x_s | x_t) of the forward process for 1-D x0 ~ N(0, v0).

    With an identity transporter this NTM *is* the true trajectory density, so its ELBO is exact.
    """

    def __init__(self, v0: float) -> None:
        super().__init__()
        self.event_shape = torch.Size((1,))
        self.v0 = v0
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, u_t, t, s, cond=None, drop_cond=None):
        var = lambda r: (1 - r) ** 2 * self.v0 + r**2  # noqa: E731
        cov = (1 - s) * (1 - t) * self.v0 + s**2 * (1 - t) / (1 - s)  # Cov(x_s, x_t): S_st plus the data part
        gain = (cov / var(t))[:, None]
        sigma = torch.sqrt(var(s) - cov**2 / var(t))[:, None]
        return gain * u_t, sigma.expand_as(u_t) + 0 * self.dummy


class ScaledReverse(GaussianReverse):
    """A deliberately wrong model (means shrunk), so its ELBO must fall strictly below log p."""

    def forward(self, u_t, t, s, cond=None, drop_cond=None):
        mu, sigma = super().forward(u_t, t, s)
        return 0.5 * mu, 1.3 * sigma


# -- exact identities -----------------------------------------------------------------------------------------


def test_log_prob_is_prior_plus_step_flows(model):
    grid = time_grid(4, 0.02)
    dist = model.distribution(grid, torch.tensor([0, 2]))
    traj = dist.sample((3,))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(traj[..., 4, :]).sum(-1)
    for k in range(1, 5):
        expected = expected + dist.step(k, traj[..., k, :]).log_prob(traj[..., k - 1, :])
    assert torch.allclose(dist.log_prob(traj), expected, atol=1e-4)


def test_pair_log_prob_selects_the_factor(model):
    dist = model.distribution(time_grid(4, 0.02), torch.tensor([0, 1, 2]))
    traj = dist.sample((5,))
    k = torch.randint(1, 5, (5, 3))
    _, factors = dist.log_prob_factors(traj)
    assert torch.allclose(dist.pair_log_prob(traj, k), factors.gather(-1, k[..., None] - 1)[..., 0], atol=1e-5)


def test_rsample_and_log_prob_agree(model):
    dist = model.distribution(time_grid(4, 0.02), torch.tensor([1, 2]))
    traj, logp = dist.rsample_and_log_prob((4,))
    assert torch.allclose(logp, dist.log_prob(traj), atol=1e-4)


def test_identity_transporter_with_fixed_sigma_is_weighted_mse():
    """-log p = sum_k ||x_{k-1} - mu_k||^2 / (2 c_k^2) + const: diffusion's weighted MSE (App. A.2)."""

    class FixedSigma(Predictor):
        def __init__(self):
            super().__init__()
            self.event_shape = torch.Size((2,))
            self.net = MLPPredictor(2, width=16, depth=1)
            _perturb(self.net, 0.3)

        def forward(self, u_t, t, s, cond=None, drop_cond=None):
            mu, _ = self.net(u_t, t, s)
            return mu, (0.1 + t - s)[:, None].expand_as(mu)

    predictor = FixedSigma()
    dist = trajflow.NTM(IdentityTransporter(2), predictor).distribution(time_grid(4, 0.05))
    traj = MarkovInterpolant().sample(torch.randn(6, 2), dist.grid)
    grid, D = dist.grid, 2
    mse, const = torch.zeros(6), -0.5 * traj[:, 4].square().sum(-1) - D / 2 * math.log(2 * math.pi)
    for k in range(1, 5):
        t, s = grid[k].expand(6), grid[k - 1].expand(6)
        mu, _ = predictor.net(traj[:, k], t, s)
        c = float(0.1 + grid[k] - grid[k - 1])
        mse += (traj[:, k - 1] - mu).square().sum(-1) / (2 * c**2)
        const -= D * (math.log(c) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(dist.log_prob(traj), const - mse, atol=1e-4)


def test_elbo_is_exact_for_the_true_reverse_process():
    v0 = 0.7
    grid = time_grid(4, 0.05, dtype=torch.float64)
    dist = trajflow.TrajectoryDistribution(IdentityTransporter(1), GaussianReverse(v0), grid)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    var0 = (1 - grid[0]) ** 2 * v0 + grid[0] ** 2
    exact = torch.distributions.Normal(0.0, var0.sqrt()).log_prob(x[:, 0])
    assert torch.allclose(dist.elbo(x), exact, atol=1e-9)  # every single draw is exact


def test_elbo_is_a_lower_bound_on_gaussian_data():
    v0 = 0.7
    grid = time_grid(4, 0.05, dtype=torch.float64)
    wrong = trajflow.TrajectoryDistribution(IdentityTransporter(1), ScaledReverse(v0), grid)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    # The wrong model's exact marginal: linear-Gaussian chain from x_T ~ N(0, 1).
    var = torch.ones(())
    for k in range(4, 0, -1):
        t, s = grid[k].reshape(1), grid[k - 1].reshape(1)
        mu, sigma = wrong.predictor(torch.ones(1, 1, dtype=torch.float64), t, s)
        var = mu[0, 0] ** 2 * var + sigma[0, 0] ** 2
    exact = torch.distributions.Normal(0.0, var.sqrt()).log_prob(x[:, 0])
    draws = torch.stack([wrong.elbo(x) for _ in range(400)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(400)
    assert bool((mean + 4 * stderr < exact).all())


# -- torch.distributions conventions ------------------------------------------------------------------------


def test_shapes_follow_torch(model):
    grid = time_grid(4, 0.02)
    dist = model.distribution(grid, torch.tensor([0, 1, 2]))
    assert dist.batch_shape == (3,) and dist.event_shape == (5, 2)
    assert dist.sample().shape == (3, 5, 2)
    assert dist.sample((7, 2)).shape == (7, 2, 3, 5, 2)
    traj = dist.sample((7,))
    assert dist.log_prob(traj).shape == (7, 3)
    assert dist.log_prob(traj[:, :1]).shape == (7, 3)  # leading dims broadcast against the batch
    unbatched = model.distribution(grid)
    assert unbatched.batch_shape == () and unbatched.log_prob(traj).shape == (7, 3)
    per_example = model.distribution(time_grid(4, torch.tensor([0.0, 0.01, 0.02])))
    assert per_example.batch_shape == (3,)


def test_expand(model):
    dist = model.distribution(time_grid(4), torch.tensor([0, 1, 2]))
    big = dist.expand((2, 3))
    assert big.batch_shape == (2, 3) and big.sample().shape == (2, 3, 5, 2)
    traj = dist.sample()
    assert torch.allclose(big.log_prob(traj), dist.log_prob(traj).expand(2, 3), atol=1e-5)
    assert big._validate_args == dist._validate_args


def test_sample_vs_rsample(model):
    dist = model.distribution(time_grid(4), torch.tensor([0, 1]))
    assert not dist.sample().requires_grad
    traj = dist.rsample((2,))
    traj.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    assert dist.has_rsample


def test_support_and_arg_constraints(model):
    dist = model.distribution(time_grid(4))
    assert dist.support.event_dim == 2 and dist.arg_constraints == {}


def test_guidance_zero_matches_conditional_and_guided_density_is_exact(model):
    grid = time_grid(4, 0.02)
    cond = torch.tensor([0, 1])
    plain, guided = model.distribution(grid, cond), model.distribution(grid, cond, guidance=3.0)
    traj = plain.sample((2,))
    assert torch.allclose(plain.log_prob(traj), model.distribution(grid, cond, guidance=0.0).log_prob(traj))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(traj[..., 4, :]).sum(-1)
    for k in range(1, 5):
        expected = expected + guided.step(k, traj[..., k, :]).log_prob(traj[..., k - 1, :])
    assert torch.allclose(guided.log_prob(traj), expected, atol=1e-4)


def test_temperature_scales_every_step_and_keeps_the_density_exact(model):
    grid, cond, tau = time_grid(4, 0.02), torch.tensor([0, 2]), 0.5
    plain, cold = model.distribution(grid, cond), model.distribution(grid, cond, temperature=tau)
    # the same draws: the prior level is untempered, the first step's draw is mu + tau * sigma * z
    u1, z1 = plain.rsample_latents((3,), generator=torch.Generator().manual_seed(1))
    u2, z2 = cold.rsample_latents((3,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and torch.equal(u1[..., 4, :], u2[..., 4, :])
    t, s = torch.ones(6), torch.full((6,), float(grid[3]))
    mu, sigma = model.predictor(u1[..., 4, :].reshape(6, 2), t, s, cond.repeat(3))
    assert torch.allclose(u2[..., 3, :].reshape(6, 2), mu + tau * sigma * z2[..., 3, :].reshape(6, 2), atol=1e-6)
    # the tempered density: each factor's z divided by tau, each log sigma raised by log tau
    traj = plain.decode(u1)
    _, f1 = plain.log_prob_factors(traj)
    _, f2 = cold.log_prob_factors(traj)
    expected = f1 - 0.5 * z1.square().sum(-1) * (1 / tau**2 - 1) - 2 * math.log(tau)  # 2 data dims
    assert torch.allclose(f2, expected, atol=1e-4)
    traj2, logp = cold.rsample_and_log_prob((4,))
    assert torch.allclose(logp, cold.log_prob(traj2), atol=1e-4)
    assert cold.expand((4, 2)).temperature == tau and "temperature=0.5" in repr(cold)
    # temperature 1 is the untempered distribution; NTM.sample passes it on
    same = model.distribution(grid, cond, temperature=1.0)
    assert torch.equal(same.log_prob(traj), plain.log_prob(traj))
    x = model.sample(cond=cond, temperature=tau, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, cold.sample(generator=torch.Generator().manual_seed(5))[..., 0, :])
    for bad in (0.0, -1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
            model.distribution(grid, cond, temperature=bad)


def test_guided_gaussian_is_the_tilted_density():
    """(1 + w) log p_c - w log p_u equals the guided Gaussian's log-density up to a constant."""
    g = torch.Generator().manual_seed(3)
    mu_c, mu_u = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    sigma_c = torch.rand(5, generator=g, dtype=torch.float64) + 0.2
    sigma_u = sigma_c + torch.rand(5, generator=g, dtype=torch.float64)  # sigma_c < sigma_u: no clipping
    w = 2.5
    mu, sigma = guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, w)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    N = torch.distributions.Normal
    tilted = (1 + w) * N(mu_c, sigma_c).log_prob(x) - w * N(mu_u, sigma_u).log_prob(x)
    diff = N(mu, sigma).log_prob(x) - tilted
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-10)  # constant in x
    precision = 1 / sigma**2
    assert torch.allclose(precision, (1 + w) / sigma_c**2 - w / sigma_u**2)
    # When sigma_c > sigma_u the ratio is clipped: guidance never widens the conditional.
    _, sigma = guided_gaussian(mu_c, sigma_u, mu_u, sigma_c, w)
    assert bool((sigma <= sigma_u + 1e-12).all())


# -- bad input ------------------------------------------------------------------------------------------------


def test_bad_inputs(model):
    grid = time_grid(4)
    dist = model.distribution(grid, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"traj: expected trailing shape \(5, 2\)"):
        dist.log_prob(torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="traj: expected finite"):
        dist.log_prob(torch.full((2, 5, 2), float("nan")))
    with pytest.raises(ValueError, match=r"traj: expected leading dims .*batch_shape \(2,\).*got leading shape \(3,\)"):
        dist.log_prob(torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match=r"k: expected an integer step index in 1\.\.4"):
        dist.step(0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="k: expected"):
        dist.step(5, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="x0: expected finite"):
        dist.elbo(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="ascending"):
        model.distribution(torch.tensor([0.0, 0.6, 0.5, 1.0]))
    with pytest.raises(ValueError, match="grid: expected times in"):
        model.distribution(torch.tensor([-0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"cond: expected class indices in \[0, 2\], got values in \[3, 3\]"):
        model.distribution(grid, torch.tensor([3]))
    with pytest.raises(ValueError, match="cond: expected integer class indices"):
        model.distribution(grid, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="guidance: classifier-free guidance needs a condition"):
        model.distribution(grid, guidance=2.0)
    with pytest.raises(ValueError, match="drop_cond: expected a bool"):
        model.distribution(grid, torch.tensor([0]), drop_cond=torch.tensor([1]))


def test_vector_condition_of_wrong_width():
    m = trajflow.NTM(ZukoTransporter(2), MLPPredictor(2, cond_features=4))
    with pytest.raises(ValueError, match=r"cond: expected vector condition \(\*batch, 4\), got shape \(3, 5\)"):
        m.distribution(time_grid(4), torch.zeros(3, 5))
    assert m.distribution(time_grid(4), torch.zeros(3, 4)).batch_shape == (3,)


def test_transporter_and_predictor_must_agree():
    with pytest.raises(ValueError, match="transporter/predictor: their event shapes disagree"):
        trajflow.NTM(ZukoTransporter(3), MLPPredictor(2))
    with pytest.raises(ValueError, match="transporter: expected a trajflow Transporter"):
        trajflow.NTM(nn.Linear(2, 2), MLPPredictor(2))


def test_validation_can_be_switched_off(model):
    dist = model.distribution(time_grid(4), validate_args=False)
    assert torch.isnan(dist.log_prob(torch.full((1, 5, 2), float("nan")))).all()


def test_a_huge_finite_level_gives_minus_infinity_never_nan(model):
    # issue 16, item 8: a finite 1e30 gave a NaN log_prob (the predictor overflows on u_t = 1e30)
    dist = model.distribution(time_grid(4, 0.02))
    traj = dist.sample((3,))
    for level in range(5):
        huge = traj.clone()
        huge[:, level] = 1e30
        assert bool((dist.log_prob(huge) == -math.inf).all()), level
    assert bool((dist.log_prob(torch.full_like(traj, 1e30)) == -math.inf).all())
    assert bool(torch.isfinite(dist.log_prob(traj)).all())  # ordinary values are untouched


def test_a_nan_from_the_networks_on_finite_input_is_refused_by_name():
    class Overflowing(MLPPredictor):  # NaN for every input: nothing overflows to -inf to explain it
        def forward(self, u_t, t, s, cond=None, drop_cond=None):
            mu, sigma = super().forward(u_t, t, s, cond, drop_cond)
            return mu * float("nan"), sigma

    dist = trajflow.NTM(ZukoTransporter(2), Overflowing(2)).distribution(time_grid(2))
    with pytest.raises(ValueError, match=r"traj: expected values the networks can evaluate in torch.float32"):
        dist.log_prob(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="traj: expected values the networks can evaluate"):
        dist.pair_log_prob(torch.zeros(2, 3, 2), torch.tensor([1, 2]))
    unchecked = trajflow.NTM(ZukoTransporter(2), Overflowing(2)).distribution(time_grid(2), validate_args=False)
    assert torch.isnan(unchecked.log_prob(torch.zeros(2, 3, 2))).all()  # the flag changes checks only


def test_inputs_of_another_dtype_are_cast_to_the_models(model):
    # issue 16, item 13: a float64 trajectory gave "mat1 and mat2 must have the same dtype"
    dist = model.distribution(time_grid(4), torch.tensor([0, 1]))
    traj = dist.sample()
    expected = dist.log_prob(traj)
    assert torch.equal(dist.log_prob(traj.double()), expected)
    assert dist.pair_log_prob(traj.double(), torch.tensor([1, 4])).dtype == torch.float32
    assert dist.step(2, traj[:, 2].double()).log_prob(traj[:, 1]).shape == (2,)
    assert dist.log_prob(traj.round().long()).dtype == torch.float32  # integers (e.g. pixel levels) too
    with pytest.raises(ValueError, match="traj: expected a real-valued .* got dtype torch.bool"):
        dist.log_prob(traj > 0)


def test_an_empty_batch_gives_an_empty_result(model):
    # issue 16, item 14: "cannot reshape tensor of 0 elements"
    dist = model.distribution(time_grid(4))
    assert dist.log_prob(torch.zeros(0, 5, 2)).shape == (0,)
    prior, factors = dist.log_prob_factors(torch.zeros(0, 3, 5, 2))
    assert prior.shape == (0, 3) and factors.shape == (0, 3, 4)
    assert dist.pair_log_prob(torch.zeros(0, 5, 2), torch.ones(0, dtype=torch.long)).shape == (0,)
    assert dist.sample((0,)).shape == (0, 5, 2)
    with pytest.raises(ValueError, match=r"sample_shape: expected a tuple of integers >= 0"):
        dist.sample((-1,))


@pytest.mark.parametrize("kind", ["mlp", "flow-matching", "velocity"])
def test_predictors_refuse_times_outside_the_unit_interval_and_nan(kind):
    # issue 16, item 9: the predictor's forward took t = 1.5 or NaN
    from trajflow.predictors import FlowMatchingPredictor
    from trajflow.velocity import MLPVelocity

    make = {
        "mlp": lambda **kw: MLPPredictor(2, width=8, depth=1, **kw),
        "flow-matching": lambda **kw: FlowMatchingPredictor(MLPVelocity(2, width=8, depth=1), **kw),
        "velocity": lambda **kw: MLPVelocity(2, width=8, depth=1, **kw),
    }[kind]
    net, u = make(), torch.randn(3, 2)
    call = (lambda n, t, s: n(u, t, s)) if kind != "velocity" else (lambda n, t, s: n(u, t))
    good, bad, nan = torch.full((3,), 0.5), torch.tensor([0.5, 1.5, 0.5]), torch.tensor([0.5, float("nan"), 0.5])
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\]"):
        call(net, bad, good * 0.5)
    with pytest.raises(ValueError, match="t: expected finite values"):
        call(net, nan, good * 0.5)
    if kind != "velocity":
        with pytest.raises(ValueError, match="s: expected finite values"):
            call(net, good, nan)
    if kind == "flow-matching":  # its velocity model checks t too; switch both off
        net = FlowMatchingPredictor(MLPVelocity(2, width=8, depth=1, validate_args=False), validate_args=False)
    else:
        net = make(validate_args=False)
    call(net, bad, good * 0.5)  # the flag changes checks only


# -- training losses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, steps", [("trajectory", 4), ("pair", 4), ("trajectory", (2, 4, 8))])
def test_trajectory_nll_trains(model, mode, steps):
    loss_fn = trajflow.TrajectoryNLL(steps=steps, mode=mode)
    x0, cond = torch.randn(64, 2) * 0.5 + 1.0, torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    before = loss_fn(model, x0, cond, generator=torch.Generator().manual_seed(0)).item()
    for _ in range(30):
        loss = loss_fn(model, x0, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_fn(model, x0, cond, generator=torch.Generator().manual_seed(0)).item()
    assert math.isfinite(after) and after < before


def test_trajectory_nll_errors(model):
    with pytest.raises(ValueError, match="mode"):
        trajflow.TrajectoryNLL(mode="jointly")
    with pytest.raises(ValueError, match="steps"):
        trajflow.TrajectoryNLL(steps=(4, 0))
    with pytest.raises(ValueError, match=r"x0: expected shape \(batch, 2\)"):
        trajflow.TrajectoryNLL()(model, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="cond: expected batch shape"):
        trajflow.TrajectoryNLL()(model, torch.zeros(4, 2), torch.zeros(5, dtype=torch.long))


# -- Pyro -----------------------------------------------------------------------------------------------------


def test_pyro_sample_site_observed_and_sampled(model):
    pyro = pytest.importorskip("pyro")
    from trajflow.contrib.pyro import to_pyro

    grid = time_grid(4, 0.02)
    traj = model.distribution(grid, torch.tensor([0, 1, 2, 0])).sample()

    def pyro_model(obs: Tensor | None = None) -> Tensor:
        label = pyro.sample("label", pyro.distributions.Categorical(logits=torch.zeros(3)).expand([4]).to_event(1))
        with pyro.plate("data", 4):
            d = to_pyro(model.distribution(grid, label))
            return pyro.sample("traj", d, obs=obs)

    conditioned = pyro.poutine.condition(pyro_model, data={"label": torch.tensor([0, 1, 2, 0])})
    tr = pyro.poutine.trace(conditioned).get_trace(traj)
    site = tr.nodes["traj"]
    assert site["is_observed"] and torch.equal(site["value"], traj)
    expected = model.distribution(grid, torch.tensor([0, 1, 2, 0])).log_prob(traj).sum()
    assert torch.allclose(tr.nodes["traj"]["fn"].log_prob(traj).sum(), expected, atol=1e-4)
    tr.compute_log_prob()
    assert torch.isfinite(tr.log_prob_sum())

    sampled = pyro.poutine.trace(pyro_model).get_trace()
    assert sampled.nodes["traj"]["value"].shape == (4, 5, 2)

    # A step flow at a site, too.
    step = to_pyro(model.distribution(grid).step(2, traj[:, 2]))
    with pyro.plate("rows", 4):
        x = pyro.sample("x_t1", step)
    assert x.shape == (4, 2)
