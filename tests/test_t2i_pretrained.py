"""T2IModel.save_pretrained / from_pretrained: config.json with the run's config + model.safetensors, no pickle;
folders of another config or class refused by name; load_t2i reads both pretrained folders and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from examples.t2i.config import T2IConfig
from examples.t2i.model import T2IModel, build_model, load_t2i
from examples.t2i.text import HashingTextEncoder
from examples.t2i.train import train_t2i
from trajflow.checkpoint import PRETRAINED_FORMAT, Pretrained, load_safetensors

pytest.importorskip("safetensors")

PROMPTS = ["a large red circle at the top left", "two large blue squares at the top left and the bottom right"]


def tiny(**model) -> dict:
    """16 px shapes, a width-32 one-layer NTM with 16 patch tokens, the hashing text encoder."""
    return {
        "name": "tiny-pretrained",
        "data": {"name": "shapes", "resolution": 16, "length": 24, "grid": 2, "sizes": ["large"]},
        "model": {"patch_size": 4, "width": 32, "depth": 1, "heads": 2, "time_features": 16, "transporter_layers": 1}
        | model,
        "text": {"encoder": "hashing", "max_length": 24},
        "train": {"max_steps": 2, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 100, "progress": False},
        "sample": {"steps": 3, "guidance": 2.0, "batch_size": 8, "grid_prompts": 0},
    }


def bundle_of(config: T2IConfig, seed: int = 0) -> T2IModel:
    """A bundle with random weights (what matters here is that they come back exactly)."""
    torch.manual_seed(seed)
    encoder = HashingTextEncoder(config.text.hashing_dim, max_length=config.text.max_length)
    model = build_model(config, encoder.feature_dim, (3, 16, 16)).eval()
    with torch.no_grad():  # move every parameter off its (partly zero) initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return T2IModel(model, config, encoder, None, Path("."), (3, 16, 16))


@pytest.mark.parametrize("model", [{}, {"kind": "fm"}, {"predictor": "posterior", "transporter": "identity"}])
def test_round_trip_gives_the_same_model_and_samples(tmp_path, model):
    config = T2IConfig.from_dict(tiny(**model))
    bundle = bundle_of(config)
    folder = bundle.save_pretrained(tmp_path / "pretrained")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing pickled
    record = json.loads((folder / "config.json").read_text())
    assert record == {"format": PRETRAINED_FORMAT, "class": "T2IModel", "config": config.to_dict()}

    again = T2IModel.from_pretrained(folder)
    assert again.config == config and again.kind == config.model.kind and again.checkpoint == folder
    assert type(again.model) is type(bundle.model) and not again.model.training
    a, b = bundle.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(bundle.generate(PROMPTS, seed=5), again.generate(PROMPTS, seed=5))
    # load_t2i, the loader of the command lines, reads pretrained folders too
    assert torch.equal(load_t2i(folder).generate(PROMPTS, seed=5), again.generate(PROMPTS, seed=5))


def test_the_config_the_caller_expects_is_checked_field_by_field(tmp_path):
    config = T2IConfig.from_dict(tiny())
    folder = bundle_of(config).save_pretrained(tmp_path)
    assert T2IModel.from_pretrained(folder, config=config).config == config  # the same config: accepted
    assert T2IModel.from_pretrained(folder, config=config.to_dict()).config == config  # or its dict
    other = tiny(cond_drop=0.2, width=64)
    with pytest.raises(ValueError, match=r"model\.cond_drop \(checkpoint: 0\.1, now: 0\.2\).*model\.width") as e:
        T2IModel.from_pretrained(folder, config=T2IConfig.from_dict(other))
    assert "model.depth" not in str(e.value)


class T2ITestAffine(Pretrained, nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, features)

    def config_dict(self):
        return {"features": self.features}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def test_folders_of_another_class_or_format_are_refused(tmp_path):
    T2ITestAffine(3).save_pretrained(tmp_path / "affine")
    with pytest.raises(ValueError, match="holds a pretrained T2ITestAffine, not a T2IModel"):
        T2IModel.from_pretrained(tmp_path / "affine")
    t2i = bundle_of(T2IConfig.from_dict(tiny())).save_pretrained(tmp_path / "t2i")
    with pytest.raises(ValueError, match="holds a pretrained T2IModel, not a T2ITestAffine"):
        T2ITestAffine.from_pretrained(t2i)
    with pytest.raises(FileNotFoundError, match="expected a pretrained folder"):
        T2IModel.from_pretrained(tmp_path / "nothing")


def test_training_checkpoints_load_with_load_t2i_and_export_to_pretrained(tmp_path):
    pytest.importorskip("accelerate")
    config = T2IConfig.from_dict(tiny())
    result = train_t2i(config, tmp_path / "run", stop_at=1)
    with pytest.raises(ValueError, match="is not a trajflow-pretrained/1 folder"):
        T2IModel.from_pretrained(result.checkpoint)  # a step folder is not a pretrained folder
    bundle = load_t2i(tmp_path / "run")  # the EMA weights of the newest step
    ema, _ = load_safetensors(result.checkpoint / "ema.safetensors")
    assert all(torch.equal(bundle.model.state_dict()[k], v) for k, v in ema.items())
    folder = bundle.save_pretrained(tmp_path / "export")
    again = T2IModel.from_pretrained(folder, config=config)  # the run's own config
    assert all(torch.equal(a, b) for a, b in zip(bundle.model.state_dict().values(), again.model.state_dict().values()))
    assert torch.equal(bundle.generate(PROMPTS, seed=1), again.generate(PROMPTS, seed=1))
