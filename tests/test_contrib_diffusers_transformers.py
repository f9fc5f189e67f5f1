"""The diffusers text-to-image transformer adapters (SD3, FLUX.1, FLUX.2) on tiny random networks: the velocity
against the raw network called as its diffusers pipeline calls it, Euler sampling against diffusers' own
FlowMatchEulerDiscreteScheduler loop, local saving and loading, an FM-initialised NTM, and the checks at the edge.

The raw calls use the pipelines' own static helpers (FluxPipeline._pack_latents, _prepare_latent_image_ids,
_unpack_latents; Flux2KleinPipeline._pack_latents, _prepare_latent_ids, _prepare_text_ids,
_unpack_latents_with_ids), so the adapters' conversions are checked against diffusers' code, not a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers", minversion="0.30", reason="the transformer adapters' tests need diffusers")

from trajflow import NTM, time_grid  # noqa: E402
from trajflow.baselines.flow_matching import FlowMatchingLoss, euler_sample  # noqa: E402
from trajflow.conditioning import check_cond, check_drop_cond  # noqa: E402
from trajflow.contrib.diffusers import Flux2Velocity, FluxVelocity, SD3Velocity  # noqa: E402
from trajflow.finetune import init_from_flow_matching  # noqa: E402
from trajflow.losses import TrajectoryNLL  # noqa: E402
from trajflow.velocity import guided_velocity  # noqa: E402

TINY_TRANSPORTER = {"patch_size": 2, "width": 16, "heads": 2, "layers_per_block": 1}
TEXT, POOLED, TOKENS = 12, 10, 5  # joint_attention_dim, pooled_projection_dim, prompt length


def _pipeline(name: str) -> Any:
    """A diffusers pipeline class, for its static packing helpers (importing it needs transformers)."""
    try:
        return getattr(__import__("diffusers", fromlist=[name]), name)
    except Exception as e:  # noqa: BLE001 - a missing optional dependency of the pipeline module
        pytest.skip(f"diffusers.{name} cannot be imported ({type(e).__name__}: {e})")


# -- the three networks, called as their pipelines call them ------------------------------------------------------


def _sd3_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED,
        pos_embed_max_size=8,
    ).eval()


def _flux_net(guidance_embeds: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        pooled_projection_dim=POOLED,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def _flux2_net(guidance_embeds: bool = False) -> torch.nn.Module:
    if not hasattr(diffusers, "Flux2Transformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no Flux2Transformer2DModel")
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    ).eval()


def _sd3_pack(x: torch.Tensor) -> torch.Tensor:
    return x  # StableDiffusion3Pipeline holds (N, C, H, W) latents


def _sd3_call(net, z, timesteps, cond):
    # StableDiffusion3Pipeline.__call__: timestep = t.expand(N), t in scheduler.timesteps (1000 sigma)
    return net(hidden_states=z, timestep=timesteps, encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample


def _flux_pack(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return _pipeline("FluxPipeline")._pack_latents(x, n, c, h, w)


def _flux_unpack(z: torch.Tensor, shape) -> torch.Tensor:
    return _pipeline("FluxPipeline")._unpack_latents(z, shape[-2], shape[-1], 1)  # vae_scale_factor 1: latent size


def _flux_call(net, z, timesteps, cond, guidance: float = 3.5):
    pipe = _pipeline("FluxPipeline")
    n, tokens = z.shape[:2]
    side = int(tokens**0.5)
    img_ids = pipe._prepare_latent_image_ids(n, side, side, z.device, z.dtype)
    txt_ids = torch.zeros(cond[0].shape[1], 3)  # FluxPipeline.encode_prompt
    g = torch.full((n,), guidance) if net.config.guidance_embeds else None
    return net(
        hidden_states=z,
        timestep=timesteps / 1000,  # FluxPipeline.__call__
        guidance=g,
        pooled_projections=cond[1],
        encoder_hidden_states=cond[0],
        txt_ids=txt_ids,
        img_ids=img_ids,
    ).sample


def _flux2_pack(x: torch.Tensor) -> torch.Tensor:
    return _pipeline("Flux2KleinPipeline")._pack_latents(x)


def _flux2_unpack(z: torch.Tensor, shape) -> torch.Tensor:
    pipe = _pipeline("Flux2KleinPipeline")
    ids = pipe._prepare_latent_ids(torch.empty(shape))  # (N, C, H, W)
    return pipe._unpack_latents_with_ids(z, ids, shape[-2], shape[-1])


def _flux2_call(net, z, timesteps, cond, guidance: float = 4.0):
    pipe = _pipeline("Flux2KleinPipeline")
    n, tokens, c = z.shape
    side = int(tokens**0.5)
    img_ids = pipe._prepare_latent_ids(torch.empty(n, c, side, side))
    return net(
        hidden_states=z,
        timestep=timesteps / 1000,  # Flux2KleinPipeline.__call__
        guidance=torch.full((n,), guidance) if net.config.guidance_embeds else None,  # Flux2Pipeline.__call__
        encoder_hidden_states=cond,
        txt_ids=pipe._prepare_text_ids(cond),
        img_ids=img_ids,
    ).sample


@dataclass
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    adapter: type
    kwargs: dict
    shape: tuple[int, int, int]  # trajflow's latent (C, H, W)
    pack: Callable
    unpack: Callable
    call: Callable
    pooled: bool = True

    def cond(self, n: int, seed: int = 3, tokens: int = TOKENS):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randn(n, tokens, TEXT, generator=g)
        return (prompt, torch.randn(n, POOLED, generator=g)) if self.pooled else prompt

    def null(self, tokens: int = TOKENS):
        one = self.cond(1, seed=11, tokens=tokens)
        return tuple(c[0] for c in one) if self.pooled else one[0]

    def raw(self, net, x, t, cond):
        """The network's velocity at trajflow's (x_t, t), called as its pipeline calls it."""
        return self.unpack(self.call(net, self.pack(x), 1000 * t, cond), x.shape)


CASES = {
    "sd3": Case("sd3", _sd3_net, SD3Velocity, {}, (4, 8, 8), _sd3_pack, lambda z, s: z, _sd3_call),
    "flux": Case("flux", _flux_net, FluxVelocity, {"sample_size": 8}, (4, 8, 8), _flux_pack, _flux_unpack, _flux_call),
    # FLUX.2's latent is the pipeline's 2x2-patchified one: an 8x8 latent of 4 channels is (16, 4, 4).
    "flux2": Case(
        "flux2",
        _flux2_net,
        Flux2Velocity,
        {"sample_size": 4},
        (16, 4, 4),
        _flux2_pack,
        _flux2_unpack,
        _flux2_call,
        pooled=False,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> tuple[Case, torch.nn.Module]:
    spec = CASES[request.param]
    return spec, spec.make()


def _rows(cond, rows):
    return tuple(c[rows] for c in cond) if isinstance(cond, tuple) else cond[rows]


def _where(drop, null, cond):
    """The condition with ``null`` (no batch dim) in the rows where ``drop`` is True."""
    if isinstance(cond, tuple):
        return tuple(_where(drop, z, c) for z, c in zip(null, cond))
    return torch.where(drop.reshape(-1, *[1] * (cond.dim() - 1)), null.expand_as(cond), cond)


# -- (1) the velocity is the raw network under the documented conversion --------------------------------------


@torch.no_grad()
def test_velocity_is_the_network_called_as_its_pipeline_calls_it(case):
    spec, net = case
    velocity = spec.adapter(net, **spec.kwargs)
    assert velocity.event_shape == spec.shape
    assert velocity.cond_event_dims == ((2, 1) if spec.pooled else 2)
    x, t, cond = torch.randn(3, *spec.shape), torch.tensor([0.9, 0.5, 0.1]), spec.cond(3)
    captured = []
    handle = net.norm_out.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        v, hidden = velocity(x, t, cond)
    finally:
        handle.remove()
    expected = spec.raw(net, x, t, cond)
    assert v.dtype == torch.float32 and expected.abs().max() > 0
    # Observed: exactly equal (the same float32 operations in the same order).
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # hidden: the image tokens proj_out reads (norm_out's output), one per patch of size velocity.patch_size
    p = velocity.patch_size
    assert hidden.shape == (3, spec.shape[1] * spec.shape[2] // p**2, velocity.hidden_features)
    torch.testing.assert_close(hidden, captured[-1], rtol=0, atol=0)
    assert not net.proj_out._forward_pre_hooks  # the capture hook lives for the call only

    # drop_cond: zeros without a null condition, the given null condition with one
    drop = torch.tensor([False, True, False])
    zeros = _where(
        drop, tuple(torch.zeros_like(c[0]) for c in cond) if spec.pooled else torch.zeros_like(cond[0]), cond
    )
    torch.testing.assert_close(velocity(x, t, cond, drop)[0], spec.raw(net, x, t, zeros), rtol=0, atol=1e-6)
    with_null = spec.adapter(net, null_cond=spec.null(), **spec.kwargs)
    nulled = _where(drop, spec.null(), cond)
    torch.testing.assert_close(with_null(x, t, cond, drop)[0], spec.raw(net, x, t, nulled), rtol=0, atol=1e-6)
    everywhere = _where(torch.ones(3, dtype=torch.bool), spec.null(), cond)
    v_null = spec.raw(net, x, t, everywhere)
    torch.testing.assert_close(with_null(x, t)[0], v_null, rtol=0, atol=1e-6)  # cond=None: the null everywhere
    # classifier-free guidance through drop_cond: trajflow's w is diffusers' guidance_scale - 1
    w = 1.5
    guided = guided_velocity(with_null, x, t, cond, w)
    torch.testing.assert_close(guided, v_null + (1 + w) * (expected - v_null), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flux_guidance_embedding_is_the_pipelines_guidance_scale():
    """A guidance-distilled FLUX gets the pipeline's ``guidance = full((N,), guidance_scale)``."""
    net = _flux_net(guidance_embeds=True)
    spec = CASES["flux"]
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.2]), spec.cond(2)
    velocity = FluxVelocity(net, sample_size=8, guidance=5.0)
    want = _flux_unpack(_flux_call(net, _flux_pack(x), 1000 * t, cond, guidance=5.0), x.shape)
    torch.testing.assert_close(velocity(x, t, cond)[0], want, rtol=0, atol=1e-6)
    assert FluxVelocity(net, sample_size=8).guidance == 3.5  # FluxPipeline's default guidance_scale
    plain = FluxVelocity(_flux_net(guidance_embeds=False), sample_size=(8, 8))
    assert plain.guidance is None


@torch.no_grad()
def test_flux2_guidance_embedding_is_the_pipelines_guidance_scale():
    """FLUX.2 dev has the guidance embedding (Flux2Pipeline, default 4.0), klein has none (Flux2KleinPipeline)."""
    t = torch.tensor([0.7, 0.2])
    net2 = _flux2_net(guidance_embeds=True)
    x2, cond2 = torch.randn(2, 16, 4, 4), CASES["flux2"].cond(2)
    for guidance, velocity in (
        (4.0, Flux2Velocity(net2, sample_size=4)),
        (2.5, Flux2Velocity(net2, sample_size=4, guidance=2.5)),
    ):
        want = _flux2_unpack(_flux2_call(net2, _flux2_pack(x2), 1000 * t, cond2, guidance=guidance), x2.shape)
        torch.testing.assert_close(velocity(x2, t, cond2)[0], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"guidance: this Flux2Transformer2DModel has no guidance embedding"):
        Flux2Velocity(_flux2_net(guidance_embeds=False), sample_size=4, guidance=4.0)


# -- (2) Euler through the adapter == diffusers' scheduler loop on the raw network ---------------------------


@torch.no_grad()
def test_euler_equals_flow_match_euler_scheduler_loop(case):
    spec, net = case
    velocity = spec.adapter(net, **spec.kwargs)
    steps, cond = 4, spec.cond(2)
    noise = torch.randn(2, *spec.shape, generator=torch.Generator().manual_seed(1))
    ours = euler_sample(velocity, noise, steps, cond=cond)

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sigmas = time_grid(steps).flip(0)[:-1]  # 1, 3/4, 1/2, 1/4; the scheduler appends sigma = 0
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    torch.testing.assert_close(scheduler.timesteps, 1000 * sigmas)
    z = spec.pack(noise)  # the pipeline's latent layout
    for timestep in scheduler.timesteps:
        z = scheduler.step(spec.call(net, z, timestep.expand(2), cond), timestep, z).prev_sample
    theirs = spec.unpack(z, noise.shape)
    # Equal up to float32 rounding of the times (the scheduler's sigmas go through numpy; observed: exactly).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - noise).abs().max() > 1e-2  # the loop did move the latents


# -- (3) local folders ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_save_and_load_local_folders(case, tmp_path):
    spec, net = case
    velocity = spec.adapter(net, null_cond=spec.null(), **spec.kwargs)
    x, t, cond = torch.randn(2, *spec.shape), torch.rand(2), spec.cond(2)
    v, hidden = velocity(x, t, cond)
    folder = velocity.save_diffusers(tmp_path / "diffusers")
    again = spec.adapter.from_diffusers(folder, **spec.kwargs)
    assert all(torch.equal(a, b) for a, b in zip(again(x, t, cond), (v, hidden)))
    net.save_pretrained(str(tmp_path / "pipeline" / "transformer"))  # a pipeline folder's layout
    nested = spec.adapter.from_diffusers(tmp_path / "pipeline", subfolder="transformer", **spec.kwargs)
    assert torch.equal(nested(x, t, cond)[0], v)
    # trajflow's own format keeps the settings and the null condition (a buffer) too
    velocity.save_pretrained(tmp_path / "trajflow")
    loaded = spec.adapter.from_pretrained(tmp_path / "trajflow")
    assert loaded.event_shape == spec.shape and loaded.settings() == velocity.settings()
    drop = torch.tensor([True, False])
    assert torch.equal(loaded(x, t, cond, drop)[0], velocity(x, t, cond, drop)[0])
    assert torch.equal(loaded(x, t)[0], velocity(x, t)[0])
    with pytest.raises(ValueError, match=r"path: expected a local folder .* nothing is downloaded"):
        spec.adapter.from_diffusers(tmp_path / "missing", **spec.kwargs)
    with pytest.raises(ValueError, match=r"path: .*config\.json' does not exist"):
        spec.adapter.from_diffusers(tmp_path, **spec.kwargs)
    other = FluxVelocity if spec.adapter is SD3Velocity else SD3Velocity
    with pytest.raises(ValueError, match=rf"path: .*config\.json' describes a diffusers {net.__class__.__name__}"):
        other.from_diffusers(folder, sample_size=8)


# -- (4) an NTM initialised from the adapter ------------------------------------------------------------------


def test_drives_a_flow_matching_initialised_ntm(case, tmp_path):
    spec, net = case
    velocity = spec.adapter(net, null_cond=spec.null(), **spec.kwargs)
    model, reference = init_from_flow_matching(velocity, transporter_kwargs=TINY_TRANSPORTER)
    predictor = model.predictor
    assert (predictor.hidden_layout, predictor.patch_size) == ("tokens", velocity.patch_size)
    n = 2
    cond = spec.cond(n)
    with torch.no_grad():
        # at init the predictor's mean is the FM posterior mean built from the network's own velocity
        u, t, s = torch.randn(n, *spec.shape), torch.full((n,), 0.5), torch.full((n,), 0.25)
        mu, sigma = predictor(u, t, s, cond)
        v = spec.raw(velocity.model, u, t, cond)
        A, B, C = (c[:, None, None, None] for c in predictor.posterior_scale(t, s))
        torch.testing.assert_close(mu, A * u + B * (u - 0.5 * v), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sigma, C.expand_as(mu))
        gen = torch.Generator().manual_seed(0)
        samples = model.sample((2,), cond=_rows(cond, slice(0, 1)), steps=4, generator=gen)
        assert samples.shape == (2, 1, *spec.shape) and bool(torch.isfinite(samples).all())
        guided = model.sample((2,), cond=_rows(cond, slice(0, 1)), steps=4, guidance=1.0, generator=gen)
        assert bool(torch.isfinite(guided).all())
    # one fine-tuning step, guidance dropout included, moves the transformer's weights
    weight = velocity.model.proj_out.weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x0 = torch.randn(n, *spec.shape)
    loss = TrajectoryNLL(steps=4, cond_drop=0.5)(model, x0, cond, generator=torch.Generator().manual_seed(2))
    loss.backward()
    optimizer.step()
    assert bool(torch.isfinite(loss)) and not torch.equal(weight, before)
    # the NTM, transformer and null condition included, saves and rebuilds from the folder alone
    model.save_pretrained(tmp_path / "ntm")
    again = NTM.from_pretrained(tmp_path / "ntm")
    with torch.no_grad():
        torch.testing.assert_close(again.predictor(u, t, s, cond)[0], model.predictor(u, t, s, cond)[0])
        torch.testing.assert_close(again.predictor(u, t, s)[0], model.predictor(u, t, s)[0])


# -- (5) bad input is refused at the edge, naming the argument ---------------------------------------------------


def test_bad_input_is_refused_at_the_edge(case):
    spec, net = case
    velocity = spec.adapter(net, **spec.kwargs)
    c, h, w = spec.shape
    x, t, cond = torch.randn(2, c, h, w), torch.rand(2), spec.cond(2)
    with pytest.raises(ValueError, match=rf"x_t: expected images of size {h}x{w}, got 2x2"):
        velocity(torch.randn(2, c, 2, 2), t, cond)
    with pytest.raises(ValueError, match=rf"x_t: expected {c} channels"):
        velocity(torch.randn(2, c + 1, h, w), t, cond)
    with pytest.raises(ValueError, match=r"t: expected a float tensor of shape \(2,\)"):
        velocity(x, torch.rand(3), cond)
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\]"):
        velocity(x, torch.tensor([0.5, 2.0]), cond)
    # the condition is checked where it enters (check_cond against the adapter's cond_spec: the flow-matching
    # loss, the samplers, an NTM's distribution), not by the adapter's forward
    name = type(velocity).__name__
    with pytest.raises(ValueError, match=rf"cond: {name} is conditional.*got None \(for unconditional calls pass"):
        check_cond(velocity, None)
    with pytest.raises(ValueError, match=rf"cond: {name} is conditional.*got None"):
        FlowMatchingLoss()(velocity, x)
    bad_width = (torch.randn(2, TOKENS, TEXT + 1), cond[1]) if spec.pooled else torch.randn(2, TOKENS, TEXT + 1)
    with pytest.raises(ValueError, match=rf"cond: expected prompt embeddings \(\*batch, \?, {TEXT}\)"):
        check_cond(velocity, bad_width)
    with pytest.raises(
        ValueError, match=r"cond: expected batch shape \(2,\) \(one condition per data point\), got \(3"
    ):
        FlowMatchingLoss()(velocity, x, spec.cond(3))
    with pytest.raises(ValueError, match=r"drop_cond: expected a bool tensor of shape \(2,\)"):
        check_drop_cond(torch.tensor([1, 0]), (2,))
    if spec.pooled:  # trajflow's (features, mask) is not this network's condition
        mask = torch.ones(2, TOKENS, dtype=torch.bool)
        with pytest.raises(ValueError, match=r"cond: expected floating-point pooled embeddings, got dtype torch.bool"):
            check_cond(velocity, (cond[0], mask))
        with pytest.raises(ValueError, match=rf"cond: expected pooled embeddings \(\*batch, {POOLED}\)"):
            check_cond(velocity, (cond[0], torch.randn(2, POOLED + 1)))
        with pytest.raises(ValueError, match=r"cond: expected a tuple \(prompt embeddings.*got a single tensor"):
            check_cond(velocity, cond[0])
    with pytest.raises(ValueError, match=r"null_cond: expected prompt embeddings"):
        spec.adapter(net, null_cond=(torch.randn(3, 7), torch.randn(POOLED)) if spec.pooled else torch.randn(3, 7))
    short = spec.adapter(net, null_cond=spec.null(tokens=3), **spec.kwargs)
    with pytest.raises(ValueError, match=r"null_cond: its 3 text tokens cannot replace .* 5 tokens"):
        short(x, t, cond, torch.tensor([True, False]))
    assert short(x, t)[0].shape == x.shape  # all-null calls use the null condition's own length
    with pytest.raises(ValueError, match=rf"transformer: expected a diffusers {spec.adapter.diffusers_class}"):
        spec.adapter(torch.nn.Linear(2, 2), **spec.kwargs)


def test_bad_settings_are_refused():
    sd3 = _sd3_net()
    with pytest.raises(ValueError, match=r"sample_size: expected a latent \(H, W\) divisible by the patch size 2"):
        SD3Velocity(sd3, sample_size=7)
    with pytest.raises(ValueError, match=r"at most pos_embed_max_size \* patch_size = 16"):
        SD3Velocity(sd3, sample_size=32)
    assert SD3Velocity(sd3, sample_size=(16, 8)).event_shape == (4, 16, 8)
    flux = _flux_net(guidance_embeds=False)
    with pytest.raises(ValueError, match=r"sample_size: FluxTransformer2DModel has no sample size"):
        FluxVelocity(flux)
    with pytest.raises(ValueError, match=r"sample_size: expected an even latent"):
        FluxVelocity(flux, sample_size=7)
    with pytest.raises(ValueError, match=r"guidance: this FluxTransformer2DModel has no guidance embedding"):
        FluxVelocity(flux, sample_size=8, guidance=3.5)
    with pytest.raises(ValueError, match=r"transformer: expected a diffusers FluxTransformer2DModel, got SD3"):
        FluxVelocity(sd3, sample_size=8)
    with pytest.raises(ValueError, match=r"num_train_timesteps: expected a positive integer, got 0"):
        SD3Velocity(sd3, num_train_timesteps=0)
