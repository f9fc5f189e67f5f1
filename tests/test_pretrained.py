"""The pretrained-folder format: round trip, refusals with named fields, no pickled code."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trajflow.checkpoint import Pretrained, build_part, part_config, read_pretrained_config

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


def test_a_model_comes_back_in_the_dtype_it_was_saved_in(tmp_path):
    model = PretrainedBase(3).double()
    with torch.no_grad():
        model.net[0].weight.add_(1e-12)  # below float32's resolution: rounding to float32 would lose it
    model.save_pretrained(tmp_path)
    again = PretrainedBase.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert b.dtype == torch.float64 and torch.equal(a, b), k


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


# -- a damaged or edited folder is refused, naming the file (issue 16, items 6, 7 and 17) -------------------------


def _tiny_ntm():
    from trajflow import NTM
    from trajflow.predictors import MLPPredictor
    from trajflow.transporters import ZukoTransporter

    return NTM(ZukoTransporter(2, hidden_features=(8,), time_features=8), MLPPredictor(2, width=8, depth=1))


def _edit_config(folder, edit) -> None:
    record = json.loads((folder / "config.json").read_text())
    edit(record)
    (folder / "config.json").write_text(json.dumps(record))


def test_the_weights_sha256_is_recorded_and_a_flipped_byte_is_refused(tmp_path):
    from trajflow import NTM
    from trajflow.checkpoint import file_sha256

    _tiny_ntm().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert read_pretrained_config(tmp_path)["weights_sha256"] == file_sha256(weights)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # a byte inside the last tensor: still a readable file, with a wrong (maybe NaN) value
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*does not match the sha256 that config\.json records"):
        NTM.from_pretrained(tmp_path)


def test_non_finite_weights_are_refused_even_without_a_checksum(tmp_path):
    from trajflow.checkpoint import save_safetensors

    model = PretrainedBase(3)
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    state["net.0.weight"][0, 0] = float("nan")
    save_safetensors(tmp_path / "model.safetensors", state)
    _edit_config(tmp_path, lambda r: r.pop("weights_sha256"))  # a folder written before the checksum
    with pytest.raises(ValueError, match=r"model\.safetensors' holds 1 NaN/inf value\(s\) in net\.0\.weight"):
        PretrainedBase.from_pretrained(tmp_path)


def test_an_unknown_field_is_refused_at_every_level_of_the_config(tmp_path):
    from trajflow import NTM

    _tiny_ntm().save_pretrained(tmp_path)
    original = (tmp_path / "config.json").read_text()
    edits = {
        r"unknown field\(s\) \['note'\]": lambda r: r.update(note=1),
        r"NTM has no field\(s\) \['guidance'\]": lambda r: r["config"].update(guidance=2.0),
        r"predictor: unknown field\(s\) \['extra'\]": lambda r: r["config"]["predictor"].update(extra=1),
        r"predictor: config: MLPPredictor has no field\(s\) \['colour'\]": (
            lambda r: r["config"]["predictor"]["config"].update(colour="red")
        ),
        r"transporter: kwargs: ZukoTransporter.*'nsf'.*\['colour'\]": (
            lambda r: r["config"]["transporter"]["config"].update(colour="red")
        ),
    }
    for match, edit in edits.items():
        (tmp_path / "config.json").write_text(original)
        _edit_config(tmp_path, edit)
        with pytest.raises(ValueError, match=match):
            NTM.from_pretrained(tmp_path)


def test_invalid_json_and_a_truncated_weights_file_name_the_file(tmp_path):
    from trajflow import NTM

    _tiny_ntm().save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON"):
        NTM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    _edit_config(tmp_path, lambda r: r.pop("weights_sha256"))  # else the checksum would catch it first
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors file"):
        NTM.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_name_the_first_mismatch_in_one_value_error(tmp_path):
    PretrainedBase(3, hidden=5).save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda r: r["config"].update(hidden=6))
    with pytest.raises(ValueError) as info:
        PretrainedBase.from_pretrained(tmp_path)
    message = str(info.value)
    assert "net.0.weight has shape (5, 3) in the file, the model expects (6, 3)" in message
    assert "the first of 3 mismatched tensor(s)" in message and message.count("\n") == 0
