"""The diffusers UNet2DModel adapter: the velocity, diffusers' flow-matching convention, saving and loading
(local folders only), driving an FM-initialised NTM, the checks at its edge; MeanFlow on a UNet (UNet2DMeanFlow)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", minversion="0.30", reason="the UNet adapter's tests need diffusers")

from trajflow import NTM, time_grid  # noqa: E402
from trajflow.baselines import MeanFlowLoss, meanflow_sample  # noqa: E402
from trajflow.baselines.flow_matching import FlowMatchingLoss, euler_sample  # noqa: E402
from trajflow.baselines.meanflow import meanflow_jvp  # noqa: E402
from trajflow.conditioning import check_cond  # noqa: E402
from trajflow.contrib.diffusers import UNet2DMeanFlow, UNet2DVelocity  # noqa: E402
from trajflow.finetune import init_from_flow_matching  # noqa: E402
from trajflow.predictors import FlowMatchingPredictor  # noqa: E402
from trajflow.velocity import guided_velocity  # noqa: E402

TINY_TRANSPORTER = {"patch_size": 2, "width": 16, "heads": 2, "layers_per_block": 1}


def _unet(seed: int = 0, **kwargs) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def unet() -> diffusers.UNet2DModel:
    return _unet()


@torch.no_grad()
def test_velocity_is_the_unet_at_1000_t(unet):
    velocity = UNet2DVelocity(unet)
    assert velocity.event_shape == (1, 8, 8) and velocity.cond_event_dims is None
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    v, hidden = velocity(x, t)
    expected = unet(x, timestep=1000 * t).sample
    assert torch.equal(v, expected) and v.dtype == torch.float32 and expected.abs().max() > 0
    # hidden: what conv_out reads, as (N, H W, C') tokens in raster order
    assert hidden.shape == (4, 64, 8)
    feature_map = hidden.transpose(1, 2).reshape(4, 8, 8, 8)
    torch.testing.assert_close(unet.conv_out(feature_map), expected, rtol=0, atol=1e-6)
    assert not unet.conv_out._forward_pre_hooks  # the capture hook lives for the call only


@torch.no_grad()
def test_convention_euler_equals_flow_match_euler_scheduler(unet):
    """trajflow's Euler sampler through the adapter == diffusers' FlowMatchEulerDiscreteScheduler loop."""
    steps, noise = 5, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = euler_sample(UNet2DVelocity(unet), noise, steps)

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sigmas = time_grid(steps).flip(0)[:-1]  # 1, 4/5, ..., 1/5; the scheduler appends sigma = 0
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    torch.testing.assert_close(scheduler.timesteps, 1000 * sigmas)
    x = noise
    for timestep in scheduler.timesteps:
        x = scheduler.step(unet(x, timestep).sample, timestep, x).prev_sample
    # Equal up to float32 rounding of the times (the scheduler's sigmas go through numpy; observed: exactly).
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    assert (ours - noise).abs().max() > 1e-2  # the loop did move the samples

    # The forward process too: scale_noise(x0, 1000 sigma, eps) == (1 - t) x0 + t eps at t = sigma.
    x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    k = 2
    t = scheduler.sigmas[k]
    noised = scheduler.scale_noise(x0, scheduler.timesteps[k : k + 1].expand(2), eps)
    torch.testing.assert_close(noised, (1 - t) * x0 + t * eps)


@torch.no_grad()
def test_save_and_load_local_folders(unet, tmp_path):
    velocity = UNet2DVelocity(unet)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    v, hidden = velocity(x, t)
    # a diffusers folder, read back with local_files_only
    folder = velocity.save_diffusers(tmp_path / "diffusers")
    assert (folder / "config.json").is_file()
    again = UNet2DVelocity.from_diffusers(folder)
    assert all(torch.equal(a, b) for a, b in zip(again(x, t), (v, hidden)))
    # a pipeline-style folder: the UNet in a subfolder
    unet.save_pretrained(str(tmp_path / "pipeline" / "unet"))
    nested = UNet2DVelocity.from_diffusers(tmp_path / "pipeline", subfolder="unet")
    assert torch.equal(nested(x, t)[0], v)
    # trajflow's own format keeps the adapter's settings too
    velocity_16 = UNet2DVelocity(unet, sample_size=16, validate_args=False)
    velocity_16.save_pretrained(tmp_path / "trajflow")
    loaded = UNet2DVelocity.from_pretrained(tmp_path / "trajflow")
    assert loaded.event_shape == (1, 16, 16) and loaded.validate_args is False
    x16, t16 = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.equal(loaded(x16, t16)[0], velocity_16(x16, t16)[0])
    with pytest.raises(ValueError, match=r"path: expected a local folder .* nothing is downloaded"):
        UNet2DVelocity.from_diffusers(tmp_path / "missing")


def test_drives_a_flow_matching_initialised_ntm(unet, tmp_path):
    velocity = UNet2DVelocity(unet)
    model, reference = init_from_flow_matching(velocity, transporter_kwargs=TINY_TRANSPORTER)
    predictor = model.predictor
    assert isinstance(predictor, FlowMatchingPredictor)
    assert (predictor.hidden_features, predictor.hidden_layout, predictor.patch_size) == (8, "tokens", 1)
    with torch.no_grad():
        samples = model.sample((2,), steps=4, t_min=0.02, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (2, 1, 8, 8) and bool(torch.isfinite(samples).all())
        # at init the predictor's mean is the FM posterior mean built from the UNet's own velocity
        u, t, s = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.full((2,), 0.25)
        mu, _ = predictor(u, t, s)
        v = unet(u, 1000 * t).sample
        A, B, _ = predictor.posterior_scale(t, s)
        torch.testing.assert_close(mu, A[:, None, None, None] * u + B[:, None, None, None] * (u - 0.5 * v))
    # the NTM, UNet included, saves with save_pretrained and rebuilds from the folder alone
    model.save_pretrained(tmp_path / "ntm")
    again = NTM.from_pretrained(tmp_path / "ntm")
    with torch.no_grad():
        torch.testing.assert_close(again.predictor(u, t, s)[0], mu, rtol=0, atol=0)


@torch.no_grad()
def test_class_labels_with_the_last_index_as_null():
    unet = _unet(num_class_embeds=4)
    velocity = UNet2DVelocity(unet)
    assert (velocity.num_classes, velocity.null_class, velocity.cond_event_dims) == (3, 3, 0)
    x, t, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 2, 1])
    drop = torch.tensor([False, True, False])
    v = velocity(x, t, labels, drop)[0]
    torch.testing.assert_close(v, unet(x, 1000 * t, class_labels=torch.tensor([0, 3, 1])).sample, rtol=0, atol=0)
    null = unet(x, 1000 * t, class_labels=torch.full((3,), 3)).sample
    torch.testing.assert_close(velocity(x, t)[0], null, rtol=0, atol=0)  # cond=None: the null class
    # classifier-free guidance goes through the same drop_cond path
    w = 1.5
    guided = guided_velocity(velocity, x, t, labels, w)
    cond_v = unet(x, 1000 * t, class_labels=labels).sample
    torch.testing.assert_close(guided, (1 + w) * cond_v - w * null, rtol=1e-5, atol=1e-6)
    # checked where the condition enters (the flow-matching loss, the samplers, an NTM's distribution)
    with pytest.raises(ValueError, match=r"cond: expected class labels in \[0, 2\] \(label 3 is the reserved null"):
        euler_sample(velocity, x, 2, cond=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"cond: expected integer class labels"):
        check_cond(velocity, labels.float())


def test_bad_input_is_refused_at_the_edge(unet):
    velocity = UNet2DVelocity(unet)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match=r"x_t: expected images of size 8x8, got 4x4"):
        velocity(torch.randn(2, 1, 4, 4), t)
    with pytest.raises(ValueError, match=r"x_t: expected 1 channels"):
        velocity(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match=r"x_t: expected images of shape \(N, C, H, W\)"):
        velocity(torch.randn(1, 8, 8), t)
    with pytest.raises(ValueError, match=r"t: expected a float tensor of shape \(2,\)"):
        velocity(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\]"):
        velocity(x, torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match=r"cond: UNet2DVelocity is unconditional"):
        FlowMatchingLoss()(velocity, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"unet: expected a diffusers UNet2DModel, got Linear"):
        UNet2DVelocity(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"sample_size: expected a positive \(H, W\) divisible by .* 2, got 7"):
        UNet2DVelocity(unet, sample_size=7)
    with pytest.raises(ValueError, match=r"num_train_timesteps: expected a positive integer, got 0"):
        UNet2DVelocity(unet, num_train_timesteps=0)


# -- MeanFlow on a UNet: UNet2DMeanFlow ---------------------------------------------------------------------


def _perturbed(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.mark.parametrize("classes", [None, 4])
def test_meanflow_at_init_equals_the_teacher_for_every_r(classes):
    teacher = UNet2DVelocity(_perturbed(_unet(num_class_embeds=classes)))
    model = UNet2DMeanFlow.from_velocity(teacher)
    z, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    cond = None if classes is None else torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        v = teacher(z, t, cond)[0]
        assert v.abs().mean() > 0.1
        # equal up to float32 rounding: the contiguous copies before GroupNorm (for the JVP) change its sums
        torch.testing.assert_close(model(z, t * torch.rand(5), t, cond), v, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(z, torch.zeros(5), t, cond), v, rtol=0, atol=1e-5)
        assert not model.interval_embedding(torch.randn(5, 8)).any()  # the interval adds exactly 0
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.base.parameters(), teacher.parameters()))
    assert not teacher.unet.time_embedding._forward_hooks  # the interval's hook lives for the call only
    assert model.event_shape == teacher.event_shape and model.num_classes == teacher.num_classes


def test_meanflow_loss_at_r_equal_t_is_flow_matching_and_trains_the_interval():
    teacher = UNet2DVelocity(_perturbed(_unet()))
    model = UNet2DMeanFlow.from_velocity(teacher)
    x0 = torch.randn(6, 1, 8, 8)
    plain = MeanFlowLoss(ratio_r_neq_t=0.0, time_dist="uniform", adaptive_p=0.0)
    want = FlowMatchingLoss()(teacher, x0, generator=torch.Generator().manual_seed(1))
    got = plain(model, x0, generator=torch.Generator().manual_seed(1))
    assert float(want) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the JVP's attention backend may sum in another order
    loss = MeanFlowLoss(ratio_r_neq_t=1.0)(model, x0, generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.interval_embedding.linear_2.weight.grad.abs().sum() > 0  # the zero layer gets a gradient


def test_meanflow_jvp_through_the_unet_is_the_finite_difference():
    """du/dt along (v, 0, 1) by forward mode, through both times (the UNet's t and the interval t - r)."""
    torch.manual_seed(3)
    model = UNet2DMeanFlow.from_velocity(UNet2DVelocity(_perturbed(_unet()).double()))
    _perturbed(model.interval_embedding)  # the interval's path no longer adds zero
    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.5], dtype=torch.float64)
    with torch.no_grad():
        u, dudt = meanflow_jvp(model, z, r, t, v)
        # diffusers' sinusoidal time projection is float32 and has periods of 1/1000 in t: a step of 1e-5 keeps
        # both its rounding and its curvature near 1e-3 of the derivative
        h = 1e-5
        fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
        torch.testing.assert_close(u, model(z, r, t), rtol=0, atol=1e-12)  # the JVP runs attention on SDPA math
        shifted = model(z, r, t) - model(z, r + 0.1, t)  # the interval changes u
    assert dudt.abs().mean() > 1e-2 and shifted.abs().max() > 1e-3
    torch.testing.assert_close(dudt, fd, rtol=0, atol=5e-3 * float(dudt.abs().max()))


def test_meanflow_sample_and_bad_input(unet):
    model = UNet2DMeanFlow.from_velocity(UNet2DVelocity(unet))
    noise = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        one_step = meanflow_sample(model, noise, 1)
        assert torch.equal(one_step, noise - model(noise, torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match=r"velocity: expected a UNet2DVelocity, got Linear"):
        UNet2DMeanFlow.from_velocity(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"r: expected r <= t, got r - t up to 0.5"):
        model(noise, torch.ones(3), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"r: expected the shape of t, \(3,\), got \(2,\)"):
        model(noise, torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"x0: expected"):
        MeanFlowLoss()(model, torch.randn(2, 1, 4, 4))
