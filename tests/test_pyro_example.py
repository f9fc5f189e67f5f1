"""A trained NTM as a Pyro prior: gradients, the noise reparametrisation, SVI, NUTS and the example script.

The known-answer case is the Gaussian random walk: an identity transporter and an untrained
``MLPPredictor`` (zero head: ``mu = u_t``, ``sigma = 1``) make ``x_T ~ N(0, I)`` and
``x_{k-1} = x_k + N(0, I)``, so ``Var(x_k) = T + 1 - k`` and ``Cov(x_k, x_0) = T + 1 - k`` per coordinate.
With ``y = x_0[0] + N(0, s^2)`` the posterior is Gaussian with ``E[x_k[0] | y] = (T + 1 - k) y / (T + 1 + s^2)``
and ``Var(x_0[0] | y) = (T + 1) s^2 / (T + 1 + s^2)``; the other coordinate keeps its prior.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import trajflow

pyro = pytest.importorskip("pyro")
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from trajflow.contrib.pyro import (  # noqa: E402
    TrajectoryNoiseReparam,
    importance_resample,
    noise_from_trajectory,
    to_pyro,
    trajectory_from_noise,
)

T, NOISE, Y = 2, 0.5, 2.0
EXACT_MEAN = [(T + 1 - k) * Y / (T + 1 + NOISE**2) for k in range(T + 1)]  # E[x_k[0] | y]
EXACT_STD_X0 = math.sqrt((T + 1) * NOISE**2 / (T + 1 + NOISE**2))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation (and the CI machine's cores are shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_walk_prior(steps: int = T):
    model = trajflow.NTM(
        trajflow.transporters.IdentityTransporter(2), trajflow.predictors.MLPPredictor(2, width=16, depth=1)
    ).requires_grad_(False)
    mu, sigma = model.predictor(torch.randn(4, 2), torch.full((4,), 0.5), torch.full((4,), 0.25))
    assert torch.equal(sigma, torch.ones(4, 2))  # the known answer needs the zero-initialised head
    return to_pyro(model.distribution(trajflow.time_grid(steps)))


def flow_prior(seed: int = 0):
    """A ZukoTransporter NTM whose predictor is not the identity (its head is perturbed)."""
    torch.manual_seed(seed)
    model = trajflow.NTM(
        trajflow.transporters.ZukoTransporter(2, hidden_features=(16, 16)),
        trajflow.predictors.MLPPredictor(2, width=16, depth=1),
    )
    torch.nn.init.normal_(model.predictor.head.weight, std=0.3)
    return to_pyro(model.requires_grad_(False).distribution(trajflow.time_grid(3)))


def inverse_problem(prior, y):
    traj = pyro.sample("traj", prior)
    pyro.sample("y", pyro.distributions.Normal(traj[..., 0, 0], NOISE), obs=y)
    return traj


NOISE_MODEL = pyro.poutine.reparam(inverse_problem, config={"traj": TrajectoryNoiseReparam()})


# -- gradients and the noise map ------------------------------------------------------------------------------


def test_log_prob_gradient_in_the_trajectory_is_the_exact_score():
    prior = random_walk_prior()
    traj = torch.randn(6, T + 1, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(prior.log_prob(traj).sum(), traj)
    # log p = log N(x_T) + sum_k log N(x_{k-1} - x_k): d/dx_j = -(x_j - x_{j+1}) + (x_{j-1} - x_j) [- x_T at j = T].
    x = traj.detach()
    expected = torch.zeros_like(x)
    expected[:, :T] -= x[:, :T] - x[:, 1:]
    expected[:, 1:] += x[:, :T] - x[:, 1:]
    expected[:, T] -= x[:, T]
    assert torch.allclose(grad, expected, atol=1e-5)


def test_log_prob_gradient_through_a_flow_transporter_matches_finite_differences():
    prior = flow_prior()
    traj = prior.sample((4,), generator=torch.Generator().manual_seed(1)).requires_grad_()
    (grad,) = torch.autograd.grad(prior.log_prob(traj).sum(), traj)
    assert bool(grad[:, :-1].abs().amax() > 0)  # the levels below T see the transporter
    direction = torch.randn_like(traj)
    eps = 1e-2
    with torch.no_grad():
        fd = (prior.log_prob(traj + eps * direction) - prior.log_prob(traj - eps * direction)) / (2 * eps)
    assert torch.allclose((grad * direction).sum((-2, -1)), fd, rtol=2e-2, atol=2e-2)


def test_trajectory_from_noise_is_rsample_for_the_same_draws_and_inverts():
    prior = flow_prior()
    g = torch.Generator().manual_seed(3)
    # rsample draws x_T first, then the base draw of each step k = T..1 (level k - 1).
    draws = [torch.randn(5, 2, generator=g) for _ in range(prior.steps + 1)]
    noise = torch.stack(draws[::-1], dim=1)  # (5, T + 1, 2), level k - 1 holds z_k, level T holds x_T
    expected = prior.rsample((5,), generator=torch.Generator().manual_seed(3))
    traj = trajectory_from_noise(prior, noise)
    assert torch.allclose(traj, expected, atol=1e-5)
    assert torch.allclose(noise_from_trajectory(prior, traj), noise, atol=1e-4)


def test_noise_map_change_of_variables_gives_the_trajectory_density():
    # log p(traj) = log N(noise; 0, I) + log |det d noise / d traj|: the step flows and log_prob agree.
    prior = flow_prior()
    traj = prior.sample(generator=torch.Generator().manual_seed(4))  # (T + 1, 2)
    jac = torch.autograd.functional.jacobian(
        lambda x: noise_from_trajectory(prior, x.reshape(traj.shape)).flatten(), traj.flatten()
    )
    noise = noise_from_trajectory(prior, traj)
    std = torch.distributions.Normal(0.0, 1.0)
    expected = std.log_prob(noise).sum() + torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(prior.log_prob(traj), expected, atol=1e-3)


def test_bad_inputs_name_the_argument():
    prior = flow_prior()
    with pytest.raises(ValueError, match="noise: expected trailing shape"):
        trajectory_from_noise(prior, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dist: expected a trajflow TrajectoryDistribution"):
        trajectory_from_noise(torch.distributions.Normal(0.0, 1.0), torch.zeros(4, 2))

    def gaussian_site():
        return pyro.sample("traj", pyro.distributions.Normal(torch.zeros(4, 2), 1.0).to_event(2))

    with pytest.raises(ValueError, match="TrajectoryNoiseReparam at site 'traj'"):
        pyro.poutine.reparam(gaussian_site, config={"traj": TrajectoryNoiseReparam()})()
    with pytest.raises(ValueError, match="batch_shape"):
        importance_resample(prior.expand((2,)), lambda x: x[:, 0, 0], 10, 5)
    with pytest.raises(ValueError, match="num_draws"):
        importance_resample(prior, lambda x: x[:, 0, 0], 0, 5)
    with pytest.raises(ValueError, match="log_likelihood: expected one value per trajectory"):
        importance_resample(prior, lambda x: x[:, 0], 10, 5)


def test_reparam_under_a_plate_with_an_initial_value_and_refusing_an_observed_site():
    prior = flow_prior()

    def program(obs=None):
        with pyro.plate("examples", 3):
            return pyro.sample("traj", prior, obs=obs)

    reparam = pyro.poutine.reparam(program, config={"traj": TrajectoryNoiseReparam()})
    tr = pyro.poutine.trace(reparam).get_trace()
    noise, traj = tr.nodes["traj_noise"]["value"], tr.nodes["traj"]["value"]
    assert noise.shape == traj.shape == (3, prior.steps + 1, 2)
    assert torch.allclose(traj, trajectory_from_noise(prior, noise))
    assert not tr.nodes["traj_noise"]["is_observed"]
    tr.compute_log_prob()
    assert torch.isfinite(tr.log_prob_sum())
    std_normal = torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(tr.nodes["traj_noise"]["log_prob"], std_normal.log_prob(noise).sum((-2, -1)))

    # A batch of trajectories declared as one event with to_event: one noise event of the same shape.
    def batched():
        return pyro.sample("traj", prior.expand((3,)).to_event(1))

    tr = pyro.poutine.trace(pyro.poutine.reparam(batched, config={"traj": TrajectoryNoiseReparam()})).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["traj_noise"]["value"].shape == (3, prior.steps + 1, 2)
    assert tr.nodes["traj_noise"]["log_prob"].shape == ()

    # An initial value (not an observation), as an init strategy would set it, is mapped back to its noise.
    start = prior.sample((3,), generator=torch.Generator().manual_seed(5))
    with pyro.poutine.trace() as tracer:
        result = TrajectoryNoiseReparam().apply(
            {"name": "traj", "fn": prior.expand((3,)), "value": start, "is_observed": False}
        )
    assert torch.equal(result["value"], start) and result["is_observed"]
    site = tracer.trace.nodes["traj_noise"]
    assert not site["is_observed"]
    assert torch.allclose(site["value"], noise_from_trajectory(prior, start), atol=1e-5)

    with pytest.raises(ValueError, match="observed; this reparameterisation is for latent trajectories only"):
        reparam(start)


# -- inference ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["trajectory", "noise"])
def test_svi_autonormal_finds_the_exact_posterior_mean(param):
    prior, y = random_walk_prior(), torch.tensor(Y)
    model = inverse_problem if param == "trajectory" else NOISE_MODEL
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=0.1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(num_particles=16, vectorize_particles=True))
    losses = [svi.step(prior, y) for _ in range(400)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 0.5  # the ELBO improved
    with torch.no_grad():
        traj = Predictive(model, guide=guide, num_samples=4000, return_sites=["traj"], parallel=True)(prior, y)["traj"]
    traj = traj.reshape(4000, T + 1, 2)
    # A mean-field Gaussian fit (reverse KL) to a Gaussian posterior of precision L has the exact mean and the
    # variances 1 / L_ii of its own coordinates. x_0[0] has L = 1 + 1/s^2 in trajectory space, so its std is
    # too small (0.45 < 0.48); in noise space x_0[0] is the sum of T + 1 noises with L = 1 + 1/s^2 each and
    # independent in the guide, so its std is too large (0.77): mean-field is wrong both ways, knowably.
    assert torch.allclose(traj[:, :, 0].mean(0), torch.tensor(EXACT_MEAN), atol=0.15)
    assert abs(float(traj[:, 0, 1].mean())) < 0.25  # the unobserved coordinate keeps its prior mean 0
    mean_field_var = 1 / (1 + NOISE**-2) * (1 if param == "trajectory" else T + 1)
    assert float(traj[:, 0, 0].std()) == pytest.approx(math.sqrt(mean_field_var), rel=0.1)


@pytest.mark.parametrize("param", ["trajectory", "noise"])
def test_nuts_few_samples(param):
    prior, y = random_walk_prior(), torch.tensor(Y)
    model = inverse_problem if param == "trajectory" else NOISE_MODEL
    site = "traj" if param == "trajectory" else "traj_noise"
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model, max_tree_depth=4), num_samples=40, warmup_steps=40, disable_progbar=True)
    mcmc.run(prior, y)
    samples = mcmc.get_samples()[site]
    assert samples.shape == (40, T + 1, 2) and bool(torch.isfinite(samples).all())
    traj = samples if param == "trajectory" else trajectory_from_noise(prior, samples)
    # The prior mean of x_0[0] is 0; the posterior's is EXACT_MEAN[0] ~ 1.85 with std ~ 0.48.
    assert abs(float(traj[:, 0, 0].mean()) - EXACT_MEAN[0]) < 0.5


def test_importance_resample_matches_the_exact_posterior():
    prior = random_walk_prior()
    y = torch.tensor(Y)
    samples, ess = importance_resample(
        prior,
        lambda traj: pyro.distributions.Normal(traj[:, 0, 0], NOISE).log_prob(y),
        50_000,
        20_000,
        chunk_size=16_384,
        generator=torch.Generator().manual_seed(0),
    )
    assert samples.shape == (20_000, T + 1, 2)
    assert 1000 < ess < 50_000
    assert torch.allclose(samples[:, :, 0].mean(0), torch.tensor(EXACT_MEAN), atol=0.05)
    assert abs(float(samples[:, 0, 0].std()) - EXACT_STD_X0) < 0.05


def test_pyro_zuko_to_pyro_wraps_a_trajectory_distribution():
    zuko_bridge = pytest.importorskip("pyro.contrib.zuko")  # pyro-ppl >= 1.9.0
    prior = flow_prior()

    def program():
        with pyro.plate("examples", 3):
            return pyro.sample("traj", zuko_bridge.ZukoToPyro(prior))

    tr = pyro.poutine.trace(program).get_trace()
    value = tr.nodes["traj"]["value"]
    assert value.shape == (3, prior.steps + 1, 2)
    tr.compute_log_prob()
    # ZukoToPyro scores with the density cached from rsample_and_log_prob; it must equal log_prob.
    assert torch.allclose(tr.nodes["traj"]["log_prob"], prior.log_prob(value), atol=1e-4)

    # TrajectoryNoiseReparam sees through the wrapper.
    reparam = pyro.poutine.reparam(program, config={"traj": TrajectoryNoiseReparam()})
    tr = pyro.poutine.trace(reparam).get_trace()
    assert torch.allclose(tr.nodes["traj"]["value"], trajectory_from_noise(prior, tr.nodes["traj_noise"]["value"]))


# -- the example script -------------------------------------------------------------------------------------------


def test_example_script_smoke_and_reload(tmp_path):
    spec = importlib.util.spec_from_file_location("inverse_problem", REPO / "examples" / "pyro" / "inverse_problem.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--smoke", "--noise-space", "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (
        saved["methods"].keys()
        == metrics["methods"].keys()
        == {
            "importance (reference)",
            "SVI AutoNormal (trajectory)",
            "NUTS (trajectory)",
            "SVI AutoNormal (noise)",
            "NUTS (noise)",
        }
    )
    for entry in saved["methods"].values():
        assert all(math.isfinite(v) for v in entry.values())
    assert saved["methods"]["importance (reference)"]["energy_distance_to_reference"] == 0.0
    assert (tmp_path / "a" / "posterior.png").stat().st_size > 1000
    # --model reuses the saved NTM (same density and levels, no training).
    again = example.main(["--smoke", "--out", str(tmp_path / "b"), "--model", str(tmp_path / "a" / "model")])
    assert not (tmp_path / "b" / "model").exists()
    assert "train" not in again["seconds"]
    assert again["methods"].keys() == {"importance (reference)", "SVI AutoNormal (trajectory)", "NUTS (trajectory)"}
