"""Initialisation from flow matching (NTM §3.3): exact equivalence at init, the mean-alignment loss, the
FM-initialised predictor's edge cases and the external-model adapter."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from trajflow import MarkovInterpolant, TrajectoryNLL, time_grid
from trajflow.conditioning import check_cond
from trajflow.finetune import (
    FinetuneLoss,
    MeanAlignmentLoss,
    check_identity,
    frozen_copy,
    identity_transporter,
    init_from_flow_matching,
    zero_init_zuko_,
)
from trajflow.predictors.from_velocity import FlowMatchingPredictor
from trajflow.predictors.transformer import TransformerPredictorConfig
from trajflow.transporters import ZukoTransporter
from trajflow.velocity import CallableVelocity, MLPVelocity, TransformerVelocity


def _randomise_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Give zero-initialised heads random weights so that the velocity is not trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


class External(nn.Module):
    """An 'external' velocity model with its own calling convention: v only."""

    def __init__(self, features: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features + 1, 32), nn.SiLU(), nn.Linear(32, features))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=-1))


@torch.no_grad()
def _fm_posterior(velocity: nn.Module, x: torch.Tensor, t: float, s: float, cond=None) -> tuple:
    """The flow-matching model's Gaussian posterior sampler N(A x + B (x - t v(x)), C^2), by hand."""
    n = x.shape[0]
    tt = torch.full((n,), t, dtype=x.dtype)
    v = velocity(x, tt, cond)[0]
    A, B, C = MarkovInterpolant.posterior(torch.tensor(t, dtype=x.dtype), torch.tensor(s, dtype=x.dtype))
    return A * x + B * (x - t * v), C * torch.ones_like(x)


def _check_equivalence(model, velocity, grid: torch.Tensor, x_shape: tuple, cond=None, atol: float = 1e-10) -> None:
    """dist.step(k, x) == the FM posterior sampler for every k: log-probs, means and scales."""
    dist = model.distribution(grid, cond)
    event_dim = len(x_shape) - 1
    T = grid.shape[-1] - 1
    for k in range(1, T + 1):
        x = 1.5 * torch.randn(x_shape, dtype=grid.dtype)
        t, s = float(grid[k]), float(grid[k - 1])
        mu_ref, sigma_ref = _fm_posterior(velocity, x, t, s, cond)
        # means and scales of the predictor, on u_t = f_T(x_t) = x_t
        tt, ss = torch.full((x.shape[0],), t, dtype=x.dtype), torch.full((x.shape[0],), s, dtype=x.dtype)
        u = x if k == T else model.transporter(x, tt)[0]
        assert torch.equal(u, x)
        mu, sigma = model.predictor(u, tt, ss, cond)
        torch.testing.assert_close(mu, mu_ref, atol=atol, rtol=0)
        torch.testing.assert_close(sigma, sigma_ref, atol=atol, rtol=0)
        # log-probs of the step flow on random points, against the Gaussian
        step = dist.step(k, x)
        y = mu_ref + sigma_ref * torch.randn_like(x) * 2.0
        ref = Independent(Normal(mu_ref, sigma_ref), event_dim).log_prob(y)
        torch.testing.assert_close(step.log_prob(y), ref, atol=1e3 * atol, rtol=0)


def test_init_equals_fm_posterior_sampler_vectors():
    velocity = _randomise_(MLPVelocity(features=2, width=32, depth=2)).double()
    model, reference = init_from_flow_matching(velocity)
    model = model.double()
    _check_equivalence(model, velocity, time_grid(4, 0.03, dtype=torch.float64), (64, 2))


def test_init_equals_fm_posterior_sampler_conditional_float32():
    velocity = _randomise_(MLPVelocity(features=3, num_classes=4, width=32, depth=1))
    model, _ = init_from_flow_matching(velocity, transporter_kwargs={"transforms": 3})
    cond = torch.randint(4, (32,))
    _check_equivalence(model, velocity, time_grid(4, 0.02, shift=1.6), (32, 3), cond, atol=2e-6)


def test_init_equals_fm_posterior_sampler_images():
    cfg = TransformerPredictorConfig((2, 4, 4), patch_size=2, width=16, depth=1, heads=2, num_classes=3)
    velocity = _randomise_(TransformerVelocity(cfg), 0.1).double()
    model, _ = init_from_flow_matching(
        velocity, transporter_kwargs={"patch_size": 2, "width": 16, "heads": 2, "layers_per_block": 1}
    )
    model = model.double()
    assert model.predictor.hidden_layout == "tokens" and model.predictor.patch_size == 2
    cond = torch.randint(3, (6,))
    _check_equivalence(model, velocity, time_grid(3, 0.05, dtype=torch.float64), (6, 2, 4, 4), cond)


def test_init_equals_fm_posterior_sampler_external_callable():
    velocity = CallableVelocity(External(2), (2,)).double()
    model, _ = init_from_flow_matching(velocity)
    _check_equivalence(model.double(), velocity, time_grid(4, 0.02, dtype=torch.float64), (16, 2))


def test_identity_transporters_are_exact():
    for shape, kwargs in [(3, {}), ((1, 4, 4), {"patch_size": 2, "width": 16, "heads": 2, "layers_per_block": 1})]:
        f = identity_transporter(shape, **kwargs)
        check_identity(f, atol=0.0)
        x = torch.randn(5, *f.event_shape)
        u, ladj = f(x, torch.rand(5))
        assert torch.equal(u, x) and torch.equal(ladj, torch.zeros(5))
    # NSF with zeroed hyper-networks: the identity up to rounding only
    nsf = zero_init_zuko_(ZukoTransporter(2, preset="nsf"))
    check_identity(nsf, atol=1e-5)


def test_non_identity_transporter_is_rejected():
    with pytest.raises(ValueError, match="identity at initialisation"):
        init_from_flow_matching(MLPVelocity(features=2, width=16), ZukoTransporter(2))
    with pytest.raises(ValueError, match="only 'maf'"):
        identity_transporter(2, preset="nsf")


def test_transporter_of_another_event_shape_is_named():
    with pytest.raises(ValueError, match=r"velocity model's event_shape \(2,\).*event_shape \(3,\)"):
        init_from_flow_matching(MLPVelocity(features=2, width=16), identity_transporter(3))


def test_aux_loss_zero_at_init_and_lambda_schedule():
    torch.manual_seed(1)
    velocity = _randomise_(MLPVelocity(features=2, width=32, depth=1))
    model, reference = init_from_flow_matching(velocity)
    assert all(not p.requires_grad for p in reference.parameters())
    loss = FinetuneLoss(TrajectoryNLL(steps=4, t_min=(0.01, 0.05)), MeanAlignmentLoss(reference), decay_steps=100)
    x0 = torch.randn(32, 2)
    total, parts = loss(model, x0, step=0)
    assert float(parts["aux"]) == pytest.approx(0.0, abs=1e-12)
    assert float(total.detach()) == pytest.approx(float(parts["nll"]))
    assert loss.lambda_at(0) == 2.5 and loss.lambda_at(50) == pytest.approx(1.25)
    assert loss.lambda_at(100) == pytest.approx(0.0, abs=1e-12) and loss.lambda_at(10**6) == pytest.approx(0.0)
    assert FinetuneLoss(loss.nll, loss.align, decay_steps=None).lambda_at(10**6) == 2.5
    # training moves the backbone away from the frozen reference: the aux term turns on
    total.backward()
    assert model.predictor.head.weight.grad.abs().sum() > 0  # the zero-initialised delta head learns
    with torch.no_grad():
        velocity.head.bias.add_(0.5)
    _, parts = loss(model, x0, step=10)
    assert float(parts["aux"]) > 1e-4
    assert reference.head.bias.data_ptr() != velocity.head.bias.data_ptr()


def test_a_flow_matching_weight_trains_the_velocity_model_by_flow_matching_only():
    torch.manual_seed(2)
    velocity = _randomise_(MLPVelocity(features=2, num_classes=3, width=16, depth=1))
    model, reference = init_from_flow_matching(velocity, input_space="data")
    with torch.no_grad():  # a transporter off the identity, so that the NLL reaches it
        for p in model.transporter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0, cond = torch.randn(16, 2), torch.randint(3, (16,))

    def grads(weights: list[float], fm: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        nll = TrajectoryNLL(steps=3, mode="pair", factor_weights=weights)
        loss = FinetuneLoss(nll, MeanAlignmentLoss(reference), aux_weight=0.0, flow_matching_weight=fm)
        model.zero_grad(set_to_none=True)
        total, parts = loss(model, (x0, cond), torch.Generator().manual_seed(4))
        total.backward()
        flat = lambda ps: torch.cat([p.grad.flatten() for p in ps])  # noqa: E731
        return flat(velocity.parameters()), flat(model.transporter.parameters()), parts

    # the same draws, the NLL weighted otherwise: the velocity model's gradient (flow matching only) is the same,
    # the transporter's is not; with w = 0 the NLL trains the velocity model too
    v_a, f_a, parts = grads([1.0, 1.0, 1.0], 0.5)
    v_b, f_b, _ = grads([1.0, 3.0, 1.0], 0.5)
    assert float(parts["fm"]) > 0 and v_a.abs().sum() > 0 and torch.equal(v_a, v_b)
    assert not torch.allclose(f_a, f_b)
    assert all(p.requires_grad for p in velocity.parameters())  # restored after the NLL
    plain_a, _, parts = grads([1.0, 1.0, 1.0], 0.0)
    plain_b, _, _ = grads([1.0, 3.0, 1.0], 0.0)
    assert "fm" not in parts and not torch.allclose(plain_a, plain_b)
    with pytest.raises(ValueError, match=r"flow_matching_weight: expected a finite number >= 0, got -1"):
        FinetuneLoss(TrajectoryNLL(steps=3), MeanAlignmentLoss(reference), flow_matching_weight=-1)
    frozen, _ = init_from_flow_matching(copy.deepcopy(velocity).requires_grad_(False), input_space="data")
    loss = FinetuneLoss(TrajectoryNLL(steps=3), MeanAlignmentLoss(reference), flow_matching_weight=1.0)
    with pytest.raises(ValueError, match=r"model.predictor.velocity: .* expected trainable parameters"):
        loss(frozen, (x0, cond))
    transported, _ = init_from_flow_matching(velocity)  # reads u_t: its velocity model never sees x_t
    loss = FinetuneLoss(TrajectoryNLL(steps=3), MeanAlignmentLoss(reference), flow_matching_weight=1.0)
    with pytest.raises(ValueError, match=r"model.predictor: .* input_space='data', got FlowMatchingPredictor"):
        loss(transported, (x0, cond))


def test_finetune_loss_modes_and_conditions():
    velocity = MLPVelocity(features=2, num_classes=3, width=16, depth=1)
    model, reference = init_from_flow_matching(velocity)
    align = MeanAlignmentLoss(reference)
    x0, cond = torch.randn(24, 2), torch.randint(3, (24,))
    for nll in (
        TrajectoryNLL(steps=(2, 4), cond_drop=0.5),
        TrajectoryNLL(steps=4, mode="pair", cond_drop=0.5),
    ):
        nll_i, aux_i = FinetuneLoss(nll, align).per_example(model, x0, cond)
        assert nll_i.shape == aux_i.shape == (24,)
        assert torch.isfinite(nll_i).all() and aux_i.abs().max() < 1e-10
    # the NLL part equals TrajectoryNLL's on the same model (same distribution, different draws)
    torch.manual_seed(3)
    ours = FinetuneLoss(TrajectoryNLL(steps=4, t_min=(0.02, 0.02), cond_drop=0.0), align)(model, (x0, cond))[1]["nll"]
    theirs = TrajectoryNLL(steps=4, t_min=(0.02, 0.02), cond_drop=0.0)(model, x0.repeat(20, 1), cond.repeat(20))
    assert float(ours) == pytest.approx(float(theirs.detach()), rel=0.2)


def test_s_zero_floor_and_error():
    velocity = MLPVelocity(features=2, width=16, depth=1)
    t, s = torch.full((3,), 0.3), torch.zeros(3)
    mu, sigma = FlowMatchingPredictor(velocity, c_min=1e-3)(torch.randn(3, 2), t, s)
    assert torch.allclose(sigma, torch.full_like(sigma, 1e-3))
    with pytest.raises(ValueError, match="c_min=0 needs s > 0"):
        FlowMatchingPredictor(velocity, c_min=0.0)(torch.randn(3, 2), t, s)
    # t_min = 0 trains with the floor: a finite NLL
    model, ref = init_from_flow_matching(velocity)
    total, _ = FinetuneLoss(TrajectoryNLL(steps=2, t_min=(0.0, 0.0)), MeanAlignmentLoss(ref))(model, torch.randn(8, 2))
    assert torch.isfinite(total)
    model0, ref0 = init_from_flow_matching(velocity, c_min=0.0)
    with pytest.raises(ValueError, match="t_min > 0"):
        TrajectoryNLL(steps=2, t_min=(0.0, 0.0))(model0, torch.randn(8, 2))


def test_bad_velocity_outputs():
    class WrongShape(nn.Module):
        def forward(self, x, t, cond):
            return torch.zeros(x.shape[0], 3)

    P = FlowMatchingPredictor(CallableVelocity(WrongShape(), (2,)))
    with pytest.raises(ValueError, match=r"expected v of shape \(4, 2\).*got \(4, 3\)"):
        P(torch.randn(4, 2), torch.full((4,), 0.5), torch.full((4,), 0.2))

    class Pair(nn.Module):
        def forward(self, x, t, cond):
            return x, torch.zeros(x.shape[0], 7)

    with pytest.raises(ValueError, match="hidden_features=None"):
        CallableVelocity(Pair(), (2,))(torch.randn(4, 2), torch.rand(4))
    with pytest.raises(ValueError, match=r"hidden: expected shape \(4, 8\)"):
        CallableVelocity(Pair(), (2,), hidden_features=8)(torch.randn(4, 2), torch.rand(4))
    with pytest.raises(ValueError, match=r"expected \(v, hidden\)"):
        CallableVelocity(External(), (2,), hidden_features=8)(torch.randn(4, 2), torch.rand(4))
    v, h = CallableVelocity(Pair(), (2,), hidden_features=7)(torch.randn(4, 2), torch.rand(4))
    assert h.shape == (4, 7)

    class WrongVelocity(nn.Module):  # a trajflow-style velocity model with a bad head
        event_shape = torch.Size((2,))
        width = 4

        def forward(self, x, t, cond=None, drop_cond=None):
            return x[:, :1], torch.zeros(x.shape[0], 4)

    with pytest.raises(ValueError, match="velocity model output"):
        FlowMatchingPredictor(WrongVelocity())(torch.randn(4, 2), torch.full((4,), 0.5), torch.full((4,), 0.2))
    with pytest.raises(ValueError, match="expected a velocity nn.Module"):
        FlowMatchingPredictor(lambda x, t, c: x)  # type: ignore[arg-type]


def test_callable_conditions_and_null_cond():
    seen = []

    class Cond(nn.Module):
        def forward(self, x, t, cond):
            seen.append(cond)
            return x * (1.0 if cond is None else cond[:, None].float())

    velocity = CallableVelocity(Cond(), (2,), cond_event_dims=0)
    x, t = torch.randn(3, 2), torch.rand(3)
    with pytest.raises(ValueError, match="null_cond"):
        velocity(x, t, torch.tensor([1, 2, 3]), torch.tensor([True, False, False]))
    velocity(x, t, torch.tensor([1, 2, 3]), torch.tensor([True, True, True]))
    assert seen[-1] is None
    velocity = CallableVelocity(Cond(), (2,), cond_event_dims=0, null_cond=torch.tensor(0))
    v, _ = velocity(x, t, torch.tensor([1, 2, 3]), torch.tensor([True, False, False]))
    assert seen[-1].tolist() == [0, 2, 3] and torch.equal(v[0], torch.zeros(2))
    with pytest.raises(ValueError, match="cond: CallableVelocity is unconditional, expected cond=None"):
        check_cond(CallableVelocity(Cond(), (2,)), torch.tensor([1]))


def test_plain_function_warns_and_frozen_copy_is_independent():
    net = nn.Linear(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CallableVelocity(lambda x, t, c: net(x), (2,))
    assert any("not an nn.Module" in str(w.message) for w in caught)
    velocity = MLPVelocity(features=2, width=8, depth=1)
    ref = frozen_copy(velocity)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in velocity.parameters())


def test_mean_alignment_formula():
    velocity = _randomise_(MLPVelocity(features=2, width=8, depth=1)).double()
    align = MeanAlignmentLoss(frozen_copy(velocity))
    x = torch.randn(5, 2, dtype=torch.float64)
    t, s = torch.full((5,), 0.6, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    mu_ref, _ = _fm_posterior(velocity, x, 0.6, 0.3)
    torch.testing.assert_close(align.mean(x, t, s), mu_ref)
    mu = mu_ref + 0.1
    torch.testing.assert_close(align(mu, x, t, s), torch.full((5,), 0.01, dtype=torch.float64))
    assert math.isclose(float(align(mu_ref, x, t, s).max()), 0.0, abs_tol=1e-24)


# -- the loss as a Trainer objective, and lambda over a share of the run --------------------------------------


def test_lambda_decays_over_a_share_of_the_run():
    model, reference = init_from_flow_matching(MLPVelocity(features=2, width=8, depth=1))
    nll, align = TrajectoryNLL(steps=2), MeanAlignmentLoss(reference)
    loss = FinetuneLoss(nll, align, decay_fraction=0.5)
    assert loss.decay_steps is None  # the step-based default gives way to the share
    assert loss.lambda_at(progress=0.0) == 2.5 and loss.lambda_at(10**6, progress=0.25) == pytest.approx(1.25)
    assert loss.lambda_at(progress=0.5) == 0.0 and loss.lambda_at(progress=1.0) == 0.0
    assert FinetuneLoss(nll, align).decay_steps == 10_000  # unchanged default
    with pytest.raises(ValueError, match="progress: FinetuneLoss\\(decay_fraction=0.5\\)"):
        loss(model, torch.randn(4, 2))  # a share of the run needs the run's progress
    with pytest.raises(ValueError, match="progress: expected the share of the run"):
        loss.lambda_at(progress=1.5)
    with pytest.raises(ValueError, match="decay_steps, decay_fraction: expected one decay schedule"):
        FinetuneLoss(nll, align, decay_steps=100, decay_fraction=0.5)
    for bad in (0.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="decay_fraction: expected a share of the run in \\(0, 1\\]"):
            FinetuneLoss(nll, align, decay_fraction=bad)
    with pytest.raises(ValueError, match="batch: expected a tensor x0 or a pair"):
        FinetuneLoss(nll, align)(model, {"x": torch.randn(4, 2)})


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Drive the Trainer's time budget with a clock that moves only when the test moves it (``now[0] += s``)."""
    import trajflow.train.trainer as train_module

    now = [0.0]
    monkeypatch.setattr(train_module, "_clock", lambda: now[0])
    return now


def test_finetune_loss_is_a_trainer_objective_and_lambda_follows_the_time_budget(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from torch.utils.data import TensorDataset

    from trajflow.train import Trainer, TrainerConfig

    torch.manual_seed(0)
    model, reference = init_from_flow_matching(MLPVelocity(features=2, num_classes=3, width=16, depth=1))
    loss = FinetuneLoss(TrajectoryNLL(steps=2, t_min=(0.02, 0.05)), MeanAlignmentLoss(reference), decay_fraction=1.0)
    now = _fake_clock(monkeypatch)

    def timed(m, batch, generator, step, *, progress):  # one fake second per step
        now[0] += 1.0
        return loss(m, batch, generator, step, progress=progress)

    timed.loss_name = loss.loss_name
    data = TensorDataset(torch.randn(32, 2), torch.randint(3, (32,)))  # batches (x0, labels): conditional
    # A time-budgeted run: `max_steps` is only a cap, 4 s of budget; lambda must follow the budget's share.
    cfg = TrainerConfig(
        max_steps=1_000_000, batch_size=8, warmup_steps=0, log_every=1, checkpoint_every=2, progress=False,
        time_budget=4.0, lr=1e-3,
    )  # fmt: skip
    part = Trainer(cfg, tmp_path).fit(model, timed, data, stop_at=2)
    rest = Trainer(cfg, tmp_path).fit(model, timed, data, resume=True)  # progress comes back from the checkpoint
    history = part.history + rest.history
    assert [h["step"] for h in history] == [1, 2, 3, 4] and rest.step == 4  # stopped by the budget
    assert all({"finetune_loss", "nll", "aux", "lambda"} <= set(h) for h in history)
    expected = [2.5 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.0, 0.25, 0.5, 0.75)]
    assert [h["lambda"] for h in history] == pytest.approx(expected)
    assert history[-1]["aux"] > 0  # training moved the backbone away from the reference
    # The loss itself, untouched, is the objective too (the Trainer's call form, step-based decay).
    plain = FinetuneLoss(loss.nll, loss.align, decay_steps=4)
    out = Trainer(TrainerConfig(max_steps=3, batch_size=8, warmup_steps=0, log_every=1, progress=False), tmp_path / "b")
    result = out.fit(model, plain, data)
    assert [h["lambda"] for h in result.history] == pytest.approx([2.5, 2.5 * 0.5 * (1 + math.cos(math.pi / 4)), 1.25])


def test_dequantized_objective_passes_step_and_progress_to_the_loss():
    from trajflow.likelihood import DequantizedObjective

    model, reference = init_from_flow_matching(MLPVelocity(features=4, width=8, depth=1))
    nll, align = TrajectoryNLL(steps=2, t_min=(0.02, 0.05)), MeanAlignmentLoss(reference)
    images, g = torch.randint(0, 17, (8, 4)), torch.Generator().manual_seed(0)
    by_share = DequantizedObjective(FinetuneLoss(nll, align, decay_fraction=1.0), levels=17)
    _, parts = by_share(model, (images, torch.zeros(8)), g, 3, progress=0.5)
    assert float(parts["lambda"]) == pytest.approx(1.25)
    by_steps = DequantizedObjective(FinetuneLoss(nll, align, decay_steps=4), levels=17)
    _, parts = by_steps(model, (images, torch.zeros(8)), g, 2, progress=0.9)
    assert float(parts["lambda"]) == pytest.approx(1.25)
    # a loss without a schedule gets neither
    assert DequantizedObjective(nll, levels=17)(model, images, g, 5, progress=0.5).shape == ()


def test_t2i_benchmark_decays_the_alignment_weight_over_the_time_budget():
    """benchmarks/t2i.py trains ntm-fm with a time budget and a 1,000,000-step cap: lambda must decay by budget."""
    pytest.importorskip("accelerate")
    import importlib.util
    import sys
    from pathlib import Path

    from examples.t2i.objective import TextToImageObjective

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_t2i", root / "benchmarks" / "t2i.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_t2i"] = bench  # dataclasses look their module up
        spec.loader.exec_module(bench)
        task = bench.BENCH_CONFIGS["cpu"].tasks[0]
        method = next(m for m in bench.METHODS if m.kind == "ntm-fm")
        overrides = task.overrides + ['model.init_from="fm-run"'] + method.overrides
        cfg = bench._config(bench.read_config(method.config), overrides, 52.5, "ntm-fm")
    finally:
        sys.path.remove(str(root / "benchmarks"))
        sys.modules.pop("bench_t2i", None)
    assert cfg.train.max_steps == bench.STEP_CAP and cfg.train.time_budget == 52.5
    objective = TextToImageObjective(cfg, None, (3, 16, 16), reference=MLPVelocity(features=2, width=8, depth=1))
    lam = objective.loss.lambda_at
    # what the Trainer hands in after 300 steps and half the budget: half-way down the cosine (it was 2.5)
    assert lam(300, cfg.train.run_progress(300, 26.25)) == pytest.approx(1.25)
    assert lam(600, cfg.train.run_progress(600, 52.5)) == pytest.approx(0.0, abs=1e-12)
