"""examples/t2i paths on the CPU: an NTM initialised from a flow-matching run (exactly its posterior sampler at
step 0, trained with the mean alignment, resumable, no reference in checkpoints), a distilled denoiser, and
sampling through the raw, full and fast paths."""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from examples.t2i.config import T2IConfig
from examples.t2i.distill import DistillConfig, distill_t2i
from examples.t2i.model import build_model, init_ntm_from_fm, load_t2i
from examples.t2i.objective import TextToImageObjective
from examples.t2i.text import build_text_encoder
from examples.t2i.train import train_t2i
from trajflow import MarkovInterpolant
from trajflow.checkpoint import load_safetensors
from trajflow.denoise import load_denoiser
from trajflow.finetune import MeanAlignmentLoss, check_identity

pytest.importorskip("accelerate")  # every test here trains through the Trainer (safetensors checkpoints)
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle at the top left", "two large blue squares at the top left and the bottom right"]


def tiny(kind: str = "fm", **model) -> dict:
    """16 px shapes, a width-32 one-layer model with 16 patch tokens, the hashing text encoder."""
    return {
        "name": f"tiny-{kind}",
        "data": {"name": "shapes", "resolution": 16, "length": 24, "grid": 2, "sizes": ["large"]},
        "model": {
            "kind": kind,
            "patch_size": 4,
            "width": 32,
            "depth": 1,
            "heads": 2,
            "time_features": 16,
            "transporter_layers": 1,
            "t_min": [0.01, 0.05],
            **model,
        },
        "text": {"encoder": "hashing", "max_length": 24},
        "train": {
            "max_steps": 4,
            "batch_size": 8,
            "warmup_steps": 1,
            "log_every": 1,
            "checkpoint_every": 100,
            "progress": False,
        },
        "sample": {"steps": 3, "guidance": 2.0, "batch_size": 8, "grid_prompts": 0},
    }


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fm")
    train_t2i(T2IConfig.from_dict(tiny("fm")), out)
    return out


@pytest.fixture(scope="module")
def ntm_fm_run(tmp_path_factory, fm_run) -> Path:
    out = tmp_path_factory.mktemp("ntm_fm")
    train_t2i(T2IConfig.from_dict(tiny("ntm-fm", init_from=str(fm_run), aux_decay_steps=4)), out)
    return out


def test_ntm_fm_init_is_the_fm_posterior_sampler(fm_run):
    cfg = T2IConfig.from_dict(tiny("ntm-fm", init_from=str(fm_run)))
    encoder = build_text_encoder(cfg.text)
    model, reference = init_ntm_from_fm(cfg, encoder, (3, 16, 16))
    fm = load_t2i(fm_run, encoder=encoder)  # EMA weights
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), fm.model.state_dict().values()))
    # the architecture is build_model's, so that ntm-fm checkpoints load without the flow-matching run
    assert model.state_dict().keys() == build_model(cfg, encoder.feature_dim, (3, 16, 16)).state_dict().keys()
    check_identity(model.transporter)  # exactly the identity
    torch.manual_seed(0)
    n = 6
    x = torch.randn(n, 3, 16, 16)
    t, s = torch.full((n,), 0.6), torch.full((n,), 0.3)
    cond = encoder.encode(PROMPTS * 3)
    with torch.no_grad():
        mu, sigma = model.predictor(x, t, s, cond)
        v = fm.model(x, t, cond)[0]
    A, B, C = MarkovInterpolant.posterior(t, s)
    by_hand = A[:, None, None, None] * x + B[:, None, None, None] * (x - 0.6 * v)
    torch.testing.assert_close(mu, MeanAlignmentLoss(reference).mean(x, t, s, cond), atol=1e-6, rtol=0)
    torch.testing.assert_close(mu, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, C[:, None, None, None].expand_as(sigma), atol=1e-6, rtol=0)
    # the objective's auxiliary term vanishes at the start, with lambda = aux_weight
    objective = TextToImageObjective(cfg, encoder, (3, 16, 16), reference=reference)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": PROMPTS * 2}
    total, parts = objective(model, batch, torch.Generator().manual_seed(0), 0, progress=0.0)
    assert float(parts["aux"]) == pytest.approx(0.0, abs=1e-10) and float(parts["lambda"]) == 2.5
    # without model.aux_decay_steps lambda decays over the whole run, by the progress the trainer hands in
    # (steps or time budget): half-way through it is half of aux_weight
    assert objective.loss.decay_steps is None and objective.loss.decay_fraction == 1.0
    _, parts = objective(model, batch, torch.Generator().manual_seed(0), 1, progress=0.5)
    assert float(parts["lambda"]) == pytest.approx(1.25)
    # with it, lambda follows the optimizer step
    stepped = T2IConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "aux_decay_steps": 10}})
    objective = TextToImageObjective(stepped, encoder, (3, 16, 16), reference=reference)
    _, parts = objective(model, batch, torch.Generator().manual_seed(0), 5, progress=0.9)
    assert float(parts["lambda"]) == pytest.approx(1.25)


def test_ntm_fm_trains_resumes_and_keeps_the_reference_out(tmp_path, fm_run, ntm_fm_run):
    cfg = T2IConfig.from_dict(tiny("ntm-fm", init_from=str(fm_run), aux_decay_steps=4))
    part = train_t2i(cfg, tmp_path, stop_at=2)
    resumed = train_t2i(cfg, tmp_path, resume=True)
    whole = load_t2i(ntm_fm_run).checkpoint
    assert part.step == 2 and resumed.step == 4
    lams = [h["lambda"] for h in part.history + resumed.history]
    assert lams == pytest.approx([2.5 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert all({"nll", "aux", "finetune_loss"} <= set(h) for h in resumed.history)
    encoder = build_text_encoder(cfg.text)
    expected = build_model(cfg, encoder.feature_dim, (3, 16, 16)).state_dict().keys()
    for f in ("model.safetensors", "ema.safetensors"):
        a, _ = load_safetensors(whole / f)
        b, _ = load_safetensors(resumed.checkpoint / f)
        assert set(a) == set(expected)  # the reference is not in the checkpoint
        assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run saw the same lambda(step)
    bundle = load_t2i(ntm_fm_run)
    assert bundle.kind == "ntm-fm"
    x = bundle.generate(PROMPTS, seed=1)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_distill_and_the_three_sampling_paths(tmp_path, ntm_fm_run, fm_run):
    result = distill_t2i(
        ntm_fm_run,
        tmp_path / "den",
        max_steps=3,
        config=DistillConfig(batch_size=4, depth=1, log_every=1),
        progress=False,
    )
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(h["mse"])) for h in result.history)
    assert [h["step"] for h in result.history] == [1, 2, 3] and result.step == 3
    assert (result.path / "distill.json").is_file()
    # trained by the Trainer: its checkpoint, in its format, holds the denoiser's weights
    assert result.checkpoint == tmp_path / "den" / "training" / "checkpoints" / "step-0000003"
    assert {"model.safetensors", "optimizer.safetensors", "trainer.json", "config.json", "manifest.json"} <= {
        p.name for p in result.checkpoint.iterdir()
    }
    saved, _ = load_safetensors(result.checkpoint / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in result.denoiser.state_dict().items())
    denoiser = load_denoiser(result.path)
    bundle = load_t2i(ntm_fm_run)
    out = {}
    for path in ("raw", "full", "fast"):
        out[path] = bundle.generate(PROMPTS, seed=2, path=path, denoiser=denoiser)
        assert out[path].shape == (2, 3, 16, 16) and torch.isfinite(out[path]).all(), path
    assert not torch.equal(out["raw"], out["full"])  # denoising changes the sample at t_min = 0.02
    with pytest.warns(UserWarning, match="no-op"):
        bundle.generate(PROMPTS[:1], path="full", t_min=0.0)
    with pytest.raises(ValueError, match="denoiser"):
        bundle.generate(PROMPTS[:1], path="fast")
    with pytest.raises(ValueError, match="NTM"):
        load_t2i(fm_run).generate(PROMPTS[:1], path="full")
    with pytest.raises(ValueError, match="NTM run"):
        distill_t2i(fm_run, tmp_path / "nope", max_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"distill: DistillConfig has no field\(s\) \['nope'\]"):
        DistillConfig.from_overrides(["nope=1"])

    sample = _script("sample")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["--checkpoint", str(ntm_fm_run), "--prompt", PROMPTS[0], "--n", "2", "--out", str(tmp_path / "s")]
        assert sample.main([*args, "--path", "fast", "--denoiser", str(result.path)]) == 0
        assert sample.main([*args, "--path", "fast"]) == 2
    assert len(list((tmp_path / "s").glob("*-fast-000.png"))) == 1


def test_distillation_resumes_exactly_and_refuses_other_settings(tmp_path, ntm_fm_run, capsys):
    config = DistillConfig(batch_size=4, depth=1, log_every=1, checkpoint_every=2)
    whole = distill_t2i(ntm_fm_run, tmp_path / "whole", max_steps=4, config=config, progress=False)
    part = distill_t2i(ntm_fm_run, tmp_path / "part", max_steps=4, config=config, progress=False, stop_at=2)
    assert part.step == 2 and part.checkpoint.name == "step-0000002"
    # 24 examples / batch 4 = 6 batches an epoch: the resumed part continues the same epoch
    resumed = distill_t2i(ntm_fm_run, tmp_path / "part", max_steps=4, config=config, progress=False, resume=True)
    assert resumed.step == 4 and [h["step"] for h in resumed.history] == [3, 4]
    assert [h["mse"] for h in part.history + resumed.history] == [h["mse"] for h in whole.history]
    a, b = whole.denoiser.state_dict(), load_denoiser(resumed.path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    other = DistillConfig(batch_size=4, depth=1, log_every=1, checkpoint_every=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"distill\.lr \(checkpoint: 0\.0003, now: 0\.001\)"):
        distill_t2i(ntm_fm_run, tmp_path / "part", max_steps=4, config=other, progress=False, resume=True)
    with pytest.raises(ValueError, match="max_steps: expected a positive integer"):
        distill_t2i(ntm_fm_run, tmp_path / "x", max_steps=0, progress=False)

    script = _script("distill")  # the command line: a run, then its continuation
    args = ["--checkpoint", str(ntm_fm_run), "--out", str(tmp_path / "cli"), "--set", "batch_size=4"]
    args += ["--set", "depth=1", "--device", "cpu"]
    assert script.main([*args, "--max-steps", "2"]) == 0
    assert script.main([*args, "--max-steps", "2", "--set", "lr=1e-3", "--resume"]) == 2  # other settings: refused
    assert "distill.lr" in capsys.readouterr().err


def test_ntm_fm_config_errors(tmp_path, fm_run):
    with pytest.raises(ValueError, match="model.init_from"):
        T2IConfig.from_dict(tiny("ntm-fm"))
    cfg = T2IConfig.from_dict(tiny("ntm-fm", init_from=str(fm_run), patch_size=2, width=16))
    encoder = build_text_encoder(cfg.text)
    with pytest.raises(ValueError, match=r"model\.patch_size.*model\.width") as e:
        init_ntm_from_fm(cfg, encoder, (3, 16, 16))
    assert "model.depth" not in str(e.value)
    ntm = tmp_path / "ntm"
    train_t2i(T2IConfig.from_dict({**tiny("ntm"), "train": {**tiny()["train"], "max_steps": 1}}), ntm)
    with pytest.raises(ValueError, match="flow-matching run"):
        init_ntm_from_fm(T2IConfig.from_dict(tiny("ntm-fm", init_from=str(ntm))), encoder, (3, 16, 16))


def _script(name: str):
    """The script ``examples/t2i/<name>.py`` as the module it also is (its ``main`` takes the argument list)."""
    return importlib.import_module(f"examples.t2i.{name}")
