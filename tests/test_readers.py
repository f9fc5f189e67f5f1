"""The evaluation readers (shapes reader, text-image features): trained with the Trainer, cached, reloaded, checked."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from examples.t2i.evaluation import (
    FeatureNetConfig,
    ShapesReaderConfig,
    load_or_train_shapes_reader,
    load_or_train_text_image_features,
    render_shapes,
    shapes_dataset,
    shapes_prompts,
    train_shapes_reader,
    train_text_image_features,
)
from examples.t2i.evaluation.evaluator_cache import CACHE_VERSION, REPORT_FILE, entry_dir

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

DATA = {"name": "shapes", "resolution": 16, "grid": 2, "max_objects": 2, "max_groups": 2}
READER = ShapesReaderConfig(train_size=64, heldout_size=16, epochs=2, batch_size=16, width=4, hidden=4)
FEATURES = FeatureNetConfig(width=4, dim=8, epochs=2, batch_size=16)


def _entries(cache, prefix):
    return sorted(p for p in cache.iterdir() if p.name.startswith(prefix))


def _pairs(n=48, seed=3):
    """Shapes images and a caption stand-in: the one-hot scene labels, flattened (N, cells * classes)."""
    ds = shapes_dataset(DATA, seed=seed, length=n)
    images, labels = render_shapes(ds)
    sizes = [1 + len(ds.vocabulary[k]) for k in ("shape", "colour", "size")]
    text = torch.cat([F.one_hot(labels[..., i], sizes[i]) for i in range(3)], -1).flatten(1).float()
    return images, text


# ------------------------------------------------------------------------------------------------ shapes reader
def test_shapes_reader_cached_and_reloaded_reads_the_same(tmp_path):
    cache = tmp_path / "ev"
    reader, report = load_or_train_shapes_reader(cache, DATA, READER)
    (folder,) = _entries(cache, "shapes-reader-")
    assert (folder / REPORT_FILE).is_file() and list(folder.glob("checkpoints/step-*/model.safetensors"))
    assert report["train_steps"] == READER.epochs * (READER.train_size // READER.batch_size)
    assert 0 <= report["heldout_cell_accuracy"] <= 1 and "heldout_real_scores" in report

    again, report2 = load_or_train_shapes_reader(cache, DATA, READER)  # from the cache: no training
    assert report2 == json.loads(json.dumps(report))
    _, images, _ = shapes_prompts(DATA, 24, seed=11)
    assert torch.equal(reader.predict(images), again.predict(images))
    assert torch.equal(reader.extract(images), again.extract(images))

    # An interrupted entry (no report) is trained again, to the same weights: training is seeded.
    (folder / REPORT_FILE).unlink()
    retrained, _ = load_or_train_shapes_reader(cache, DATA, READER)
    assert torch.equal(reader.extract(images), retrained.extract(images))


def test_an_interrupted_reader_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from examples.t2i.evaluation.shapes_reader import ShapesReaderLoss

    whole, _ = load_or_train_shapes_reader(tmp_path / "whole", DATA, READER)
    real_call, seen = ShapesReaderLoss.__call__, []

    class Killed(Exception):
        pass

    def dies_at_step_5(self, model, batch, generator, step):
        if step == 5:
            raise Killed
        return real_call(self, model, batch, generator, step)

    monkeypatch.setattr(ShapesReaderLoss, "__call__", dies_at_step_5)
    with pytest.raises(Killed):
        load_or_train_shapes_reader(tmp_path / "ev", DATA, READER)
    (folder,) = _entries(tmp_path / "ev", "shapes-reader-")
    assert not (folder / REPORT_FILE).exists() and (folder / "checkpoints" / "step-0000005").is_dir()

    def records(self, model, batch, generator, step):
        seen.append(step)
        return real_call(self, model, batch, generator, step)

    monkeypatch.setattr(ShapesReaderLoss, "__call__", records)
    reader, report = load_or_train_shapes_reader(tmp_path / "ev", DATA, READER)
    assert seen == [5, 6, 7] and report["train_steps"] == 8  # only the steps after the checkpoint
    _, images, _ = shapes_prompts(DATA, 24, seed=11)
    assert torch.equal(reader.extract(images), whole.extract(images))  # the same reader as an uninterrupted one


def test_shapes_reader_cache_of_another_config_is_detected(tmp_path):
    cache = tmp_path / "ev"
    load_or_train_shapes_reader(cache, DATA, READER)
    (folder,) = _entries(cache, "shapes-reader-")
    # Another reader config trains another entry rather than reusing this one ...
    other = replace(READER, hidden=6)
    load_or_train_shapes_reader(cache, DATA, other)
    assert len(_entries(cache, "shapes-reader-")) == 2
    # ... and an entry holding another config's reader (here: copied under the name of a third config) is refused.
    third = replace(READER, width=6)
    key = {"data": json.loads((folder / "config.json").read_text())["data"], "reader": vars(third), "v": CACHE_VERSION}
    shutil.copytree(folder, entry_dir(cache, "shapes-reader", key))
    with pytest.raises(ValueError, match=r"reader\.width \(checkpoint: 4, now: 6\)"):
        load_or_train_shapes_reader(cache, DATA, third)


def test_shapes_reader_data_config_errors_and_defaults():
    with pytest.raises(ValueError, match="data_config.*shapes"):
        load_or_train_shapes_reader("unused", {"name": "emoji"}, READER)
    ds = shapes_dataset({"name": "shapes", "length": 5, "seed": 9, "path": None}, seed=1, length=2)
    assert (len(ds), ds.seed, ds.resolution, ds.grid) == (2, 1, 32, 3)  # the generator's defaults


def test_training_leaves_the_callers_random_and_accelerate_state(tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    before = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
    torch.manual_seed(123)
    expected = torch.rand(3)
    vocabulary = shapes_dataset(DATA, seed=0, length=1).vocabulary
    torch.manual_seed(123)
    reader, _ = train_shapes_reader(lambda seed, n: shapes_dataset(DATA, seed=seed, length=n), vocabulary, 2, READER)
    assert torch.equal(torch.rand(3), expected)
    assert (dict(AcceleratorState._shared_state), dict(PartialState._shared_state)) == before
    assert not reader.training


# ------------------------------------------------------------------------------------------------ text-image features
def test_text_image_features_cached_and_reloaded_embed_the_same(tmp_path):
    calls = []

    def make_pairs():
        calls.append(1)
        return _pairs()

    key = {"data": "shapes-16", "text": "one-hot labels"}
    net, report = load_or_train_text_image_features(tmp_path, key, make_pairs, FEATURES)
    assert report["train_pairs"] + report["heldout_pairs"] == 48 and 0 <= report["heldout_retrieval_top1"] <= 1
    assert (report["resolution"], report["text_dim"]) == (16, 4 * (5 + 9 + 3))
    again, report2 = load_or_train_text_image_features(tmp_path, key, make_pairs, FEATURES)
    assert len(calls) == 1 and report2 == json.loads(json.dumps(report))
    images, text = _pairs(16, seed=5)
    assert torch.equal(net.extract(images), again.extract(images))
    assert torch.equal(net.alignment(images, text), again.alignment(images, text))

    # The same pairs through train_text_image_features give the same network (seeded split, init and order).
    fresh, _ = train_text_image_features(*_pairs(), FEATURES)
    assert torch.equal(fresh.extract(images), net.extract(images))


def test_text_image_features_cache_of_another_key_is_detected(tmp_path):
    key = {"data": "a"}
    load_or_train_text_image_features(tmp_path, key, _pairs, FEATURES)
    (folder,) = _entries(tmp_path, "features-")
    load_or_train_text_image_features(tmp_path, {"data": "b"}, _pairs, FEATURES)  # another key: another entry
    assert len(_entries(tmp_path, "features-")) == 2
    other = {"data": {"data": "c"}, "features": vars(FEATURES), "v": CACHE_VERSION}
    shutil.copytree(folder, entry_dir(tmp_path, "features", other))
    with pytest.raises(ValueError, match=r"data\.data \(checkpoint: 'a', now: 'c'\)"):
        load_or_train_text_image_features(tmp_path, {"data": "c"}, _pairs, FEATURES)


def test_text_image_features_rejects_mismatched_pairs():
    with pytest.raises(ValueError, match="images, text"):
        train_text_image_features(torch.zeros(4, 3, 16, 16), torch.zeros(5, 8), FEATURES)
