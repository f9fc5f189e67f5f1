"""Reproducible sampling: every sampler takes ``generator=`` and then leaves torch's global RNG alone."""

from collections.abc import Callable

import pytest
import torch

import trajflow
from trajflow.denoise import MLPDenoiser, MLPDenoiserConfig, fast_sample, sample_denoised
from trajflow.predictors import MLPPredictor
from trajflow.transporters import ZukoTransporter


@pytest.fixture(scope="module")
def model() -> trajflow.NTM:
    torch.manual_seed(0)
    model = trajflow.NTM(ZukoTransporter(2, hidden_features=(8,)), MLPPredictor(2, num_classes=3, width=16, depth=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero-initialised head, so that samples depend on the noise
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _dist(model: trajflow.NTM) -> trajflow.TrajectoryDistribution:
    return model.distribution(trajflow.time_grid(3, 0.02), torch.tensor([0, 2]), guidance=1.0)


def _samplers(model: trajflow.NTM) -> dict[str, Callable[[torch.Generator | None], object]]:
    denoiser = MLPDenoiser(MLPDenoiserConfig(features=2, num_classes=3, width=16, depth=1, time_features=8))
    cond = torch.tensor([1, 0])
    return {
        "sample": lambda g: _dist(model).sample((4,), generator=g),
        "rsample": lambda g: _dist(model).rsample((4,), generator=g),
        "rsample_latents": lambda g: _dist(model).rsample_latents((4,), generator=g),
        "rsample_and_log_prob": lambda g: _dist(model).rsample_and_log_prob((4,), generator=g),
        "NTM.sample": lambda g: model.sample((4,), cond=cond, steps=3, guidance=1.0, generator=g),
        "sample_denoised": lambda g: sample_denoised(_dist(model), (4,), generator=g),
        "fast_sample": lambda g: fast_sample(model, denoiser, (4,), cond=cond, steps=3, generator=g),
    }


def _flat(out: object) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return torch.cat([p.detach().reshape(-1) for p in parts])


@pytest.mark.parametrize(
    "name",
    ["sample", "rsample", "rsample_latents", "rsample_and_log_prob", "NTM.sample", "sample_denoised", "fast_sample"],
)
def test_same_seed_same_samples_and_the_global_rng_untouched(model, name):
    run = _samplers(model)[name]
    state = torch.get_rng_state()
    a = _flat(run(torch.Generator().manual_seed(5)))
    b = _flat(run(torch.Generator().manual_seed(5)))
    c = _flat(run(torch.Generator().manual_seed(6)))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew from the global generator
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # bit-identical on the CPU
    assert not torch.equal(a, c)


def test_without_a_generator_the_global_rng_is_used_as_before(model):
    dist = _dist(model)
    torch.manual_seed(3)
    a = dist.sample((2,))
    torch.manual_seed(3)
    b = dist.sample((2,))
    assert torch.equal(a, b)
    assert torch.equal(a, dist.sample((2,), generator=torch.Generator().manual_seed(3)))  # the same stream
    with pytest.raises(TypeError):
        dist.sample((2,), torch.Generator())  # keyword-only: sample(sample_shape) stays torch's signature


def test_generate_seeds_a_generator_per_batch_and_leaves_the_global_rng(monkeypatch):
    from examples.t2i.config import T2IConfig
    from examples.t2i.model import build_model
    from examples.t2i.sampling import generate
    from examples.t2i.text import HashingTextEncoder

    cfg = T2IConfig.from_dict(
        {
            "name": "tiny",
            "data": {"name": "shapes", "resolution": 16},
            "model": {
                "kind": "ntm",
                "patch_size": 4,
                "width": 16,
                "depth": 1,
                "heads": 2,
                "time_features": 8,
                "transporter_layers": 1,
            },
            "text": {"encoder": "hashing", "max_length": 12},
        }
    )
    encoder = HashingTextEncoder(16, max_length=12)
    torch.manual_seed(0)
    net = build_model(cfg, encoder.feature_dim, (3, 16, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def no_global_seed(*args, **kwargs):
        raise AssertionError("generate must not reseed the global generator")

    monkeypatch.setattr(torch, "manual_seed", no_global_seed)
    prompts = ["a red circle", "a blue square", "a green diamond"]
    state = torch.get_rng_state()
    x = generate(net, encoder, prompts, steps=2, guidance=1.0, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert torch.equal(x, generate(net, encoder, prompts, steps=2, guidance=1.0, seed=3, batch_size=2))
    assert not torch.equal(x, generate(net, encoder, prompts, steps=2, guidance=1.0, seed=4, batch_size=2))
