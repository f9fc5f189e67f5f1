"""Trajectory score denoising (exact on Gaussian data), the learned denoiser, distillation and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from trajflow import NTM, MarkovInterpolant, time_grid
from trajflow.denoise import (
    DistillationLoss,
    MLPDenoiser,
    MLPDenoiserConfig,
    TransformerDenoiser,
    fast_sample,
    load_denoiser,
    sample_denoised,
    save_denoiser,
    trajectory_score_denoise,
)
from trajflow.finetune import frozen_copy, identity_transporter
from trajflow.predictors import MLPPredictor, Predictor
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.transporters import IdentityTransporter


class GaussianReverse(Predictor):
    r"""The exact reverse conditionals :math:`p(x_s | x_t)` of the forward chain for :math:`x_0 \sim N(m, v I)`.

    Everything is jointly Gaussian: :math:`x_t \sim N((1 - t) m, (1 - t)^2 v + t^2)` and
    :math:`\mathrm{Cov}(x_s, x_t) = (1 - s)(1 - t) v + s^2 (1 - t) / (1 - s)` for :math:`s < t` (the
    data part plus :math:`S_{st}`), so :math:`p(x_s | x_t)` is Gaussian conditioning. With the identity
    transporter the NTM's trajectory density is then exactly the true one.
    """

    def __init__(self, mean: Tensor, var: Tensor) -> None:
        super().__init__()
        self.event_shape = torch.Size(mean.shape)
        self.register_buffer("m", mean)
        self.register_buffer("v", var)

    def forward(self, u_t, t, s, cond=None, drop_cond=None):
        t, s = t[:, None].to(u_t), s[:, None].to(u_t)
        var_t = (1 - t) ** 2 * self.v + t**2
        var_s = (1 - s) ** 2 * self.v + s**2
        cov = (1 - s) * (1 - t) * self.v + s**2 * (1 - t) / (1 - s)
        mu = (1 - s) * self.m + cov / var_t * (u_t - (1 - t) * self.m)
        return mu, torch.sqrt(var_s - cov**2 / var_t)


def _gaussian_model(mean: Tensor, var: Tensor) -> NTM:
    return NTM(IdentityTransporter(mean.shape[0]), GaussianReverse(mean, var))


def _tweedie(x_t0: Tensor, t0: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """E[x_0 | x_{t_0}] for x_0 ~ N(m, v): m + (1 - t0) v / ((1 - t0)^2 v + t0^2) (x_{t0} - (1 - t0) m)."""
    return mean + (1 - t0) * var / ((1 - t0) ** 2 * var + t0**2) * (x_t0 - (1 - t0) * mean)


@pytest.mark.parametrize(
    "mean, var",
    [
        (torch.tensor([0.7]), torch.tensor([0.25])),
        (torch.tensor([1.5, -0.5]), torch.tensor([0.04, 2.0])),
    ],
)
def test_score_denoise_is_tweedie_on_gaussian_data(mean, var):
    mean, var = mean.double(), var.double()
    model = _gaussian_model(mean, var)
    grid = time_grid(4, 0.2, dtype=torch.float64)
    dist = model.distribution(grid)
    x0 = mean + var.sqrt() * torch.randn(64, mean.shape[0], dtype=torch.float64)
    traj = MarkovInterpolant().sample(x0, grid)  # (64, 5, D)
    est = trajectory_score_denoise(dist, traj, return_trajectory=True)  # (64, 4, D)
    expected = _tweedie(traj[:, 0], grid[0], mean, var)
    torch.testing.assert_close(est[:, 0], expected, atol=1e-5, rtol=1e-5)
    # every level's Tweedie estimate agrees: the chain is Markov, so E[x0 | trajectory] = E[x0 | x_t0]
    torch.testing.assert_close(est, expected[:, None].expand_as(est), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trajectory_score_denoise(dist, traj), est[:, 0])
    # the correction is not a no-op here: x_t0 / (1 - t0) is far from the answer
    assert (traj[:, 0] / (1 - grid[0]) - expected).abs().mean() > 0.05


def test_score_denoise_batched_grids_and_samples():
    mean, var = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    model = _gaussian_model(mean, var)
    t0 = torch.tensor([0.02, 0.1, 0.3], dtype=torch.float64)
    grid = time_grid(3, t0, shift=1.5, dtype=torch.float64)  # (3, 4): one grid per batch element
    dist = model.distribution(grid)
    traj = dist.sample((5,))  # (5, 3, 4, 2)
    est = trajectory_score_denoise(dist, traj)
    assert est.shape == (5, 3, 2)
    torch.testing.assert_close(est, _tweedie(traj[:, :, 0], t0[:, None], mean, var), atol=1e-5, rtol=1e-5)


def test_score_denoise_edge_cases():
    mean, var = torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    model = _gaussian_model(mean, var)
    # t0 = 0: row 0 of S vanishes, the output is the first level itself
    dist = model.distribution(time_grid(2, 0.0, dtype=torch.float64))
    traj = dist.sample((4,))
    torch.testing.assert_close(trajectory_score_denoise(dist, traj), traj[:, 0])
    # clipping: 100% changes nothing, a low percentile bounds the step
    dist = model.distribution(time_grid(2, 0.3, dtype=torch.float64))
    traj = 3.0 * dist.sample((16,))
    full = trajectory_score_denoise(dist, traj)
    torch.testing.assert_close(trajectory_score_denoise(dist, traj, clip_percentile=100.0), full)
    clipped = trajectory_score_denoise(dist, traj, clip_percentile=10.0)
    assert not torch.allclose(clipped, full)
    with pytest.raises(ValueError, match="clip_percentile"):
        trajectory_score_denoise(dist, traj, clip_percentile=0.0)
    with pytest.raises(ValueError, match="traj"):
        trajectory_score_denoise(dist, traj[:, :2])
    # the model's parameters get no gradient
    small = NTM(identity_transporter(2), MLPPredictor(2, width=16, depth=1))
    trajectory_score_denoise(small.distribution(time_grid(2, 0.1)), torch.randn(3, 3, 2))
    assert all(p.grad is None for p in small.parameters())


def test_guided_or_tempered_score_uses_the_untempered_conditional_model():
    model = NTM(identity_transporter(2), MLPPredictor(2, num_classes=3, width=16, depth=1))
    with torch.no_grad():
        model.predictor.head.weight.normal_(0, 0.3)
    grid, cond = time_grid(3, 0.05), torch.tensor([0, 2])
    traj = torch.randn(4, 2, 4, 2)
    guided = trajectory_score_denoise(model.distribution(grid, cond, guidance=2.0), traj)
    plain = trajectory_score_denoise(model.distribution(grid, cond), traj)
    torch.testing.assert_close(guided, plain)
    for kw in ({"temperature": 0.5}, {"temperature": 1.5, "guidance": 2.0}):  # the score is the model's own
        torch.testing.assert_close(trajectory_score_denoise(model.distribution(grid, cond, **kw), traj), plain)
    tempered = model.distribution(grid, cond, temperature=0.5)
    assert not torch.allclose(tempered.log_prob(traj), model.distribution(grid, cond).log_prob(traj))


def test_sample_denoised_shapes():
    model = NTM(identity_transporter(2), MLPPredictor(2, num_classes=3, width=16, depth=1))
    out = sample_denoised(model.distribution(time_grid(4, 0.02), torch.tensor([0, 1, 2])), (5,))
    assert out.shape == (5, 3, 2) and torch.isfinite(out).all()
    img = _image_model()
    out = sample_denoised(img.distribution(time_grid(2, 0.02)), (3,), clip_percentile=99.0)
    assert out.shape == (3, 1, 4, 4) and torch.isfinite(out).all()


def _image_model() -> NTM:
    cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
    transporter = identity_transporter((1, 4, 4), patch_size=2, width=16, heads=2, layers_per_block=1)
    for p in transporter.parameters():  # not the identity any more
        p.data.add_(0.05 * torch.randn_like(p))
    return NTM(transporter, TransformerPredictor(cfg))


def test_distillation_loss_decreases_and_fast_sample():
    torch.manual_seed(0)
    teacher = NTM(identity_transporter(2), MLPPredictor(2, num_classes=3, width=32, depth=1))
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    teacher = frozen_copy(teacher)
    denoiser = MLPDenoiser(MLPDenoiserConfig(features=2, num_classes=3, width=32, depth=1, time_features=16))
    loss = DistillationLoss(teacher, steps=4, t_min=(0.05, 0.05))
    x0, cond = 2.0 * torch.randn(64, 2), torch.randint(3, (64,))
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        value = loss(denoiser, x0, cond, generator=g.manual_seed(0))  # same draws: a clean decrease
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    out = fast_sample(teacher, denoiser, (7,), cond=torch.tensor([0, 1]), steps=4, t_min=0.05, guidance=1.0)
    assert out.shape == (7, 2, 2) and torch.isfinite(out).all()
    u0, t0, target, drop = loss.targets(x0[:8], cond[:8])
    assert u0.shape == target.shape == (8, 2) and t0.shape == (8,)


def test_transformer_denoiser_distillation_smoke():
    torch.manual_seed(0)
    teacher = frozen_copy(_image_model())
    cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
    denoiser = TransformerDenoiser(cfg)
    x0 = torch.randn(8, 1, 4, 4)
    loss = DistillationLoss(teacher, steps=2)
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    g = torch.Generator()
    losses = []
    for _ in range(15):
        value = loss(denoiser, x0, generator=g.manual_seed(0))
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert losses[-1] < losses[0]
    out = fast_sample(teacher, denoiser, (3,), steps=2)
    assert out.shape == (3, 1, 4, 4)


def test_denoiser_checkpoints(tmp_path):
    pytest.importorskip("safetensors")
    g = MLPDenoiser(MLPDenoiserConfig(features=2, width=16, depth=1))
    for p in g.parameters():
        p.data.normal_()
    save_denoiser(g, tmp_path / "mlp")
    loaded = load_denoiser(tmp_path / "mlp")
    u, t = torch.randn(4, 2), torch.full((4,), 0.02)
    torch.testing.assert_close(loaded(u, t), g(u, t))
    into = MLPDenoiser(MLPDenoiserConfig(features=2, width=16, depth=1))
    load_denoiser(tmp_path / "mlp", into=into)
    torch.testing.assert_close(into(u, t), g(u, t))
    with pytest.raises(ValueError, match=r"depth \(checkpoint: 1, now: 2\), width \(checkpoint: 16, now: 32\)"):
        load_denoiser(tmp_path / "mlp", into=MLPDenoiser(MLPDenoiserConfig(features=2, width=32, depth=2)))
    cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
    save_denoiser(TransformerDenoiser(cfg), tmp_path / "tf")
    assert isinstance(load_denoiser(tmp_path / "tf"), TransformerDenoiser)
    other = TransformerPredictorConfig((1, 4, 4), patch_size=1, width=16, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"patch_size \(checkpoint: 2, now: 1\)"):
        load_denoiser(tmp_path / "tf", into=TransformerDenoiser(other))
    with pytest.raises(ValueError, match="holds a pretrained TransformerDenoiser, not a MLPDenoiser"):
        load_denoiser(tmp_path / "tf", into=g)
    with pytest.raises(FileNotFoundError, match="expected a pretrained folder"):
        load_denoiser(tmp_path / "missing")


def test_bad_inputs():
    teacher = NTM(identity_transporter(2), MLPPredictor(2, width=16, depth=1))
    with pytest.raises(ValueError, match="event shape"):
        fast_sample(teacher, MLPDenoiser(MLPDenoiserConfig(features=3, width=8, depth=1)), (2,))
    with pytest.raises(ValueError, match="t_min"):
        DistillationLoss(teacher, t_min=(0.1, 0.05))
    with pytest.raises(ValueError, match="x0"):
        DistillationLoss(teacher)(MLPDenoiser(MLPDenoiserConfig(features=2, width=8, depth=1)), torch.randn(4, 3))
