"""save_pretrained / from_pretrained on the library's models: NTMs, predictors, transporters, velocity models and
learned denoisers round-trip exactly; other classes, other configs and parts without a config are refused."""

from __future__ import annotations

import json

import pytest
import torch
import zuko
from torch import nn

from trajflow import NTM, time_grid
from trajflow.checkpoint import read_pretrained_config
from trajflow.denoise import (
    LearnedDenoiser,
    MLPDenoiser,
    MLPDenoiserConfig,
    TransformerDenoiser,
    load_denoiser,
    save_denoiser,
)
from trajflow.finetune import init_from_flow_matching
from trajflow.predictors import (
    FlowMatchingPredictor,
    MLPPredictor,
    TransformerPredictor,
    TransformerPredictorConfig,
)
from trajflow.transporters import (
    IdentityTransporter,
    TransformerTransporter,
    TransformerTransporterConfig,
    ZukoTransporter,
)
from trajflow.velocity import CallableVelocity, MLPVelocity, TransformerVelocity

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("safetensors")

IMAGE = (1, 4, 4)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every parameter redrawn: zero-initialised heads would make any two copies agree."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def round_trip(model: nn.Module, folder) -> nn.Module:
    """Save, load with the model's own class, and check the loaded copy's config and state dict are identical."""
    model.save_pretrained(folder)
    again = type(model).from_pretrained(folder)
    assert type(again) is type(model)
    as_json = lambda m: json.loads(json.dumps(m.config_dict()))  # noqa: E731 (tuples compare as lists)
    assert as_json(again) == as_json(model)
    ours, theirs = model.state_dict(), again.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    return again.eval()


def tiny_transformer_transporter(**kwargs) -> TransformerTransporter:
    cfg = TransformerTransporterConfig(IMAGE, 2, width=16, heads=2, layers_per_block=1, time_features=8, **kwargs)
    return TransformerTransporter(cfg)


def tiny_predictor_config(**kwargs) -> TransformerPredictorConfig:
    return TransformerPredictorConfig(IMAGE, 2, width=16, depth=1, heads=2, time_features=8, **kwargs)


def text_cond(n: int, length: int = 3, features: int = 5):
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, -1] = False  # one padded token
    return torch.randn(n, length, features, generator=gen), mask


NTMS = {
    "zuko-mlp": lambda: (
        NTM(
            ZukoTransporter(features=2, hidden_features=(8,), time_features=8, bins=4),
            MLPPredictor(features=2, num_classes=3, width=8, depth=1, time_features=8, scale_bound=5.0),
        ),
        torch.tensor([0, 2, 1]),
    ),
    "identity-flow-matching-mlp": lambda: (
        NTM(
            IdentityTransporter(2),
            FlowMatchingPredictor(MLPVelocity(2, cond_features=4, width=8, depth=1), delta_mean=True, c_min=1e-2),
        ),
        torch.randn(3, 4, generator=torch.Generator().manual_seed(2)),
    ),
    "flow-matching-init": lambda: (
        init_from_flow_matching(MLPVelocity(2, width=8, depth=1), transporter_kwargs={"hidden_features": (8,)}).model,
        None,
    ),
    "transformer-class-conditional": lambda: (
        NTM(tiny_transformer_transporter(num_classes=3), TransformerPredictor(tiny_predictor_config(num_classes=3))),
        torch.tensor([0, 2, 1]),
    ),
    "transformer-flow-matching-text": lambda: (
        NTM(
            tiny_transformer_transporter(),
            FlowMatchingPredictor(TransformerVelocity(tiny_predictor_config(text_features=5)), time_features=0),
        ),
        text_cond(3),
    ),
}


@pytest.mark.parametrize("name", sorted(NTMS))
def test_an_ntm_round_trip_gives_the_same_log_prob(name, tmp_path):
    model, cond = NTMS[name]()
    model = perturbed(model)
    again = round_trip(model, tmp_path)
    grid = time_grid(2, 0.05)
    x = torch.randn(3, 3, *model.event_shape, generator=torch.Generator().manual_seed(3))  # (batch, T + 1, *data)
    with torch.no_grad():
        want = model.distribution(grid, cond).log_prob(x)
        got = again.distribution(grid, cond).log_prob(x)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
    record = read_pretrained_config(tmp_path)
    assert record["class"] == "NTM"
    assert record["config"]["transporter"]["class"] == type(model.transporter).__name__
    assert record["config"]["predictor"]["class"] == type(model.predictor).__name__


def test_same_samples_from_the_same_seed(tmp_path):
    model, _ = NTMS["zuko-mlp"]()
    model = perturbed(model)
    again = round_trip(model, tmp_path)
    cond = torch.tensor([1, 2])
    a = model.sample((2,), cond=cond, steps=3, generator=torch.Generator().manual_seed(5))
    b = again.sample((2,), cond=cond, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_from_pretrained_puts_the_model_on_the_device(tmp_path):
    model, cond = NTMS["transformer-class-conditional"]()
    perturbed(model).save_pretrained(tmp_path)
    again = NTM.from_pretrained(tmp_path, device="cuda")
    assert again.device.type == "cuda"
    grid, x = time_grid(2, 0.05), torch.randn(3, 3, *IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.distribution(grid, cond).log_prob(x)
        got = again.distribution(grid.cuda(), cond.cuda()).log_prob(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLPVelocity(3, num_classes=4, width=8, depth=2, time_features=8),
        lambda: TransformerVelocity(tiny_predictor_config(num_classes=4, kv_heads=1)),
    ],
    ids=["mlp", "transformer"],
)
def test_a_velocity_model_round_trip_gives_the_same_velocity(make, tmp_path):
    model = perturbed(make())
    again = round_trip(model, tmp_path)
    x = torch.randn(5, *model.event_shape, generator=torch.Generator().manual_seed(4))
    t, cond = torch.linspace(0.1, 0.9, 5), torch.tensor([0, 1, 2, 3, 0])
    drop = torch.tensor([False, True, False, False, True])
    with torch.no_grad():
        (v, h), (v2, h2) = model(x, t, cond, drop), again(x, t, cond, drop)
    assert torch.equal(v, v2) and torch.equal(h, h2)
    assert v.abs().sum() > 0  # the perturbed head is not the zero map


@pytest.mark.parametrize(
    "make, cond",
    [
        (lambda: MLPDenoiser(MLPDenoiserConfig(features=2, cond_features=3, width=8, depth=1)), torch.randn(4, 3)),
        (lambda: TransformerDenoiser(tiny_predictor_config(text_features=5)), text_cond(4)),
    ],
    ids=["mlp", "transformer"],
)
def test_a_denoiser_round_trip_gives_the_same_denoised_output(make, cond, tmp_path):
    model = perturbed(make())
    again = round_trip(model, tmp_path)
    u, t0 = torch.randn(4, *model.event_shape, generator=torch.Generator().manual_seed(6)), torch.full((4,), 0.02)
    with torch.no_grad():
        want = model(u, t0, cond)
        assert torch.equal(again(u, t0, cond), want)
        # The base class rebuilds whichever denoiser wrote the folder; the old function names still work.
        assert torch.equal(LearnedDenoiser.from_pretrained(tmp_path)(u, t0, cond), want)
        assert torch.equal(load_denoiser(save_denoiser(model, tmp_path / "old-name"))(u, t0, cond), want)
        into = make()
        assert load_denoiser(tmp_path, into=into) is into
        assert torch.equal(into.eval()(u, t0, cond), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLPPredictor(2, cond_features=3, width=8, depth=2, time_features=8),
        lambda: TransformerPredictor(tiny_predictor_config(num_classes=2, scale_bound=4.0)),
        lambda: FlowMatchingPredictor(MLPVelocity(2, width=8, depth=1), hidden_features=8, time_features=4),
        lambda: tiny_transformer_transporter(text_features=5, blocks=3),
        lambda: ZukoTransporter(3, preset="maf", transforms=3, hidden_features=(8, 8), time_features=4),
        lambda: IdentityTransporter((1, 2, 2)),
    ],
    ids=["mlp-predictor", "transformer-predictor", "flow-matching", "transformer-transporter", "zuko-maf", "identity"],
)
def test_parts_round_trip_on_their_own(make, tmp_path):
    model = make()
    round_trip(perturbed(model), tmp_path)


def test_from_pretrained_on_another_class_names_both(tmp_path):
    MLPVelocity(2, width=8, depth=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a pretrained MLPVelocity, not a NTM"):
        NTM.from_pretrained(tmp_path)
    model, _ = NTMS["zuko-mlp"]()
    model.save_pretrained(tmp_path / "ntm")
    with pytest.raises(ValueError, match="holds a pretrained NTM, not a MLPVelocity"):
        MLPVelocity.from_pretrained(tmp_path / "ntm")
    with pytest.raises(ValueError, match="holds a pretrained NTM, not a LearnedDenoiser"):
        load_denoiser(tmp_path / "ntm")


def test_an_expected_config_that_differs_names_the_fields(tmp_path):
    model, _ = NTMS["zuko-mlp"]()
    model.save_pretrained(tmp_path)
    expected = model.config_dict()
    assert isinstance(NTM.from_pretrained(tmp_path, config=expected), NTM)
    expected["predictor"]["config"]["width"] = 16
    expected["transporter"]["config"]["bins"] = 8
    with pytest.raises(ValueError) as info:
        NTM.from_pretrained(tmp_path, config=expected)
    message = str(info.value)
    assert "predictor.config.width (checkpoint: 8, now: 16)" in message
    assert "transporter.config.bins (checkpoint: 4, now: 8)" in message


def test_a_denoiser_of_another_config_or_class_is_refused(tmp_path):
    MLPDenoiser(MLPDenoiserConfig(features=2, width=8, depth=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"depth \(checkpoint: 1, now: 2\), width \(checkpoint: 8, now: 16\)"):
        load_denoiser(tmp_path, into=MLPDenoiser(MLPDenoiserConfig(features=2, width=16, depth=2)))
    with pytest.raises(ValueError, match="holds a pretrained MLPDenoiser, not a TransformerDenoiser"):
        load_denoiser(tmp_path, into=TransformerDenoiser(tiny_predictor_config()))
    with pytest.raises(ValueError, match="holds a pretrained MLPDenoiser, not a TransformerDenoiser"):
        TransformerDenoiser.from_pretrained(tmp_path)


def test_a_config_field_the_class_does_not_have_is_refused(tmp_path):
    tiny_transformer_transporter().save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    record["config"]["dropout"] = 0.1  # e.g. written by another version
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"TransformerTransporterConfig has no field\(s\) \['dropout'\]"):
        TransformerTransporter.from_pretrained(tmp_path)


def _external_velocity():
    class External(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def forward(self, x, t, cond):
            return self.net(x)

    return CallableVelocity(External(), (2,))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: NTM(ZukoTransporter(2, zuko.flows.NSF(2, context=16)), MLPPredictor(2, width=8, depth=1)),
            "transporter: a ZukoTransporter built from a user flow cannot be rebuilt",
        ),
        (
            lambda: NTM(IdentityTransporter(2), FlowMatchingPredictor(_external_velocity())),
            "predictor: velocity: a CallableVelocity cannot be saved",
        ),
        (
            lambda: NTM(ZukoTransporter(2, activation=nn.ELU), MLPPredictor(2, width=8, depth=1)),
            "transporter: config field 'activation' is a type",
        ),
    ],
    ids=["zuko-user-flow", "callable-velocity", "zuko-non-json-kwarg"],
)
def test_a_part_without_a_config_is_a_type_error_at_save_time(make, match, tmp_path):
    with pytest.raises(TypeError, match=match):
        make().save_pretrained(tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_an_nflows_transporter_is_refused_by_name(tmp_path):
    pytest.importorskip("nflows")
    from trajflow.transporters import NflowsTransporter

    model = NTM(NflowsTransporter(2, preset="maf", hidden_features=8), MLPPredictor(2, width=8, depth=1))
    with pytest.raises(TypeError, match="transporter: a NflowsTransporter cannot be saved"):
        model.save_pretrained(tmp_path)


def test_loading_an_ntm_never_unpickles(tmp_path, monkeypatch):
    import pickle

    model, _ = NTMS["transformer-flow-matching-text"]()
    model.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(NTM.from_pretrained(tmp_path), NTM)


MLP_CONFIGS = st.fixed_dictionaries(
    {
        "features": st.integers(1, 4),
        "width": st.integers(1, 8),
        "depth": st.integers(1, 3),
        "time_features": st.sampled_from([2, 4, 8]),
    }
).flatmap(
    lambda base: st.one_of(
        st.just({**base}),
        st.integers(1, 5).map(lambda k: {**base, "num_classes": k}),
        st.integers(1, 5).map(lambda k: {**base, "cond_features": k}),
    )
)


@settings(deadline=None, max_examples=15, derandomize=True)
@given(config=MLP_CONFIGS, scale_bound=st.floats(0.5, 10.0))
def test_mlp_configs_rebuild_the_same_function(config, scale_bound):
    # Every constructor argument must be in config_dict: a model rebuilt from it and given the same weights
    # must compute the same function, whichever arguments were given.
    n = 3
    u, t, s = torch.randn(n, config["features"]), torch.full((n,), 0.7), torch.full((n,), 0.3)
    cond = None
    if "num_classes" in config:
        cond = torch.arange(n) % config["num_classes"]
    elif "cond_features" in config:
        cond = torch.randn(n, config["cond_features"])
    calls = [
        (MLPPredictor(**config, scale_bound=scale_bound), lambda m: m(u, t, s, cond)),
        (MLPVelocity(**config), lambda m: m(u, t, cond)),
        (MLPDenoiser(MLPDenoiserConfig(**config)), lambda m: m(u, t, cond)),
    ]
    for model, call in calls:
        perturbed(model)
        again = type(model).from_config(json.loads(json.dumps(model.config_dict())))
        again.load_state_dict(model.state_dict())
        with torch.no_grad():
            for a, b in zip(torch.utils._pytree.tree_leaves(call(model)), torch.utils._pytree.tree_leaves(call(again))):
                assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"width": 0}, {"depth": -1}, {"width": 2.5}])
def test_mlp_networks_refuse_bad_sizes_by_name(bad):
    from trajflow.predictors import MLPPredictor
    from trajflow.velocity import MLPVelocity

    (name,) = bad
    for cls in (MLPPredictor, MLPVelocity):
        with pytest.raises(ValueError, match=f"{name}: expected an integer"):
            cls(2, **bad)
