"""The pretrained-folder format: round trip, refusals with named fields, no pickled code."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trajflow.pretrained import Pretrained, build_part, part_config, read_pretrained_config

pytest.importorskip("safetensors")


class PretrainedBase(Pretrained, nn.Module):
    def __init__(self, features: int, hidden: int = 4) -> None:
        super().__init__()
        self.features, self.hidden = features, hidden
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, features))
        self.register_buffer("scale", torch.full((features,), 2.0))

    def config_dict(self):
        return {"features": self.features, "hidden": self.hidden}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class PretrainedChild(PretrainedBase):
    pass


class PretrainedOther(PretrainedBase):
    pass


def test_round_trip_restores_weights_and_buffers(tmp_path):
    model = PretrainedBase(3, hidden=5)
    with torch.no_grad():
        model.scale.fill_(7.0)
    model.save_pretrained(tmp_path)
    again = PretrainedBase.from_pretrained(tmp_path)
    assert again.hidden == 5
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert read_pretrained_config(tmp_path)["class"] == "PretrainedBase"


def test_a_base_class_rebuilds_the_subclass_that_wrote_the_folder(tmp_path):
    PretrainedChild(2).save_pretrained(tmp_path)
    assert type(PretrainedBase.from_pretrained(tmp_path)) is PretrainedChild


def test_another_class_is_refused_by_name(tmp_path):
    PretrainedOther(2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a pretrained PretrainedOther, not a PretrainedChild"):
        PretrainedChild.from_pretrained(tmp_path)


def test_an_expected_config_that_differs_names_the_fields(tmp_path):
    PretrainedBase(3, hidden=5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hidden \(checkpoint: 5, now: 6\)"):
        PretrainedBase.from_pretrained(tmp_path, config={"features": 3, "hidden": 6})


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    PretrainedBase(3, hidden=5).save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    record["config"]["hidden"] = 6  # a tampered config: the weights no longer fit the model it builds
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises((ValueError, RuntimeError), match="net"):
        PretrainedBase.from_pretrained(tmp_path)


def test_not_a_pretrained_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a pretrained folder"):
        PretrainedBase.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a trajflow-pretrained/1 folder"):
        PretrainedBase.from_pretrained(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    PretrainedBase(2).save_pretrained(tmp_path)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    PretrainedBase.from_pretrained(tmp_path)


def test_parts_and_unserialisable_configs():
    record = part_config(PretrainedChild(2, hidden=3), "transporter")
    assert record == {"class": "PretrainedChild", "config": {"features": 2, "hidden": 3}}
    assert isinstance(build_part(record, "transporter"), PretrainedChild)
    with pytest.raises(TypeError, match="predictor: a Linear cannot be saved"):
        part_config(nn.Linear(2, 2), "predictor")
    with pytest.raises(ValueError, match="transporter: unknown pretrained class 'Nope'"):
        build_part({"class": "Nope", "config": {}}, "transporter")

    class Bad(PretrainedBase):
        def config_dict(self):
            return {"features": self.features, "fn": len}

    with pytest.raises(TypeError, match="config field 'fn' is a builtin_function_or_method"):
        Bad(2).save_pretrained("/nonexistent/never/written")


def test_class_names_must_be_unique():
    with pytest.raises(TypeError, match="already used"):
        type("PretrainedBase", (Pretrained, nn.Module), {"__module__": "somewhere.else"})


def test_a_model_without_tensors_round_trips(tmp_path):
    from trajflow.checkpoint import load_safetensors, save_safetensors

    save_safetensors(tmp_path / "empty.safetensors", {}, {})  # e.g. an identity transporter's weights
    assert load_safetensors(tmp_path / "empty.safetensors") == ({}, {})
