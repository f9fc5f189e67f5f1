"""A toy method interrupted part-way and resumed through the Trainer ends with the same weights as an
uninterrupted one, and its checkpoints are the library's format (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trajflow.recipes.toy import ToyConfig, build_model, run_toy, train_method


def _tiny_config(**kw) -> ToyConfig:
    base = dict(
        iters=6,
        batch_size=32,
        test_size=100,
        sample_size=100,
        elbo_samples=1,
        fm_steps_many=5,
        width=16,
        depth=1,
        transporter_hidden=8,
        threads=1,
        progress=False,
        checkpoint_every=2,
    )
    base.update(kw)
    return ToyConfig(**base)


@pytest.mark.parametrize("method", ["ntm", "fm"])
def test_interrupted_and_resumed_equals_uninterrupted(method: str, tmp_path: Path) -> None:
    cfg = _tiny_config()
    reference, ref_record = train_method(method, cfg, tmp_path / "whole")
    # Killed after step 3: a step that is not a multiple of checkpoint_every, checkpointed as an interruption.
    _, first = train_method(method, cfg, tmp_path / "split", stop_at=3)
    assert first.iters == 3
    resumed, record = train_method(method, cfg, tmp_path / "split", resume=True)
    assert record.resumed_from == 3 and record.iters == 6 == ref_record.iters
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # And training did move the weights (the comparison above is not between two untouched models).
    untrained = build_model(method, cfg).state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in resumed.state_dict().items())


def test_checkpoints_are_config_json_and_safetensors(tmp_path: Path) -> None:
    cfg = _tiny_config()
    model, record = train_method("ntm", cfg, tmp_path, stop_at=4)
    folder = tmp_path / "ntm" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000002", "step-0000004"]
    assert record.checkpoint == folder / "step-0000004"
    config = json.loads((record.checkpoint / "config.json").read_text())
    assert config["method"] == "ntm" and config["toy"]["density"] == "checkerboard"
    assert config["train"]["steps"] == 6 and config["train"]["batch_size"] == 32
    weights = load_file(record.checkpoint / "model.safetensors")
    assert set(weights) == set(build_model("ntm", cfg).state_dict())
    # The returned model holds the EMA weights of that checkpoint.
    ema = load_file(record.checkpoint / "ema.safetensors")
    params = dict(model.named_parameters())
    assert set(ema) == set(params)
    for name, value in ema.items():
        assert torch.equal(params[name].detach(), value), name
    # torch.save files (optimizer, scheduler, random states) only inside the Trainer's step folders.
    assert all(p.parent.parent == folder for p in tmp_path.rglob("*.pt"))


def test_run_toy_resumes_an_interrupted_method(tmp_path: Path) -> None:
    cfg = _tiny_config(methods=("fm",))
    whole = run_toy(cfg, tmp_path / "whole").metrics["methods"]
    train_method("fm", cfg, tmp_path / "split", stop_at=2)  # as if the job was killed during fm's training
    resumed = run_toy(cfg, tmp_path / "split", resume=True).metrics["methods"]
    for label in ("fm-euler-4", "fm-euler-5"):
        for key in ("energy_distance", "sliced_wasserstein", "train_iters"):
            assert resumed[label][key] == whole[label][key], (label, key)
