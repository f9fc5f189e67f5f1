"""Text-image datasets: procedural shapes, emoji, caption folders, metadata.jsonl folders, tar shards."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from examples.t2i.data import (
    BACKGROUNDS,
    COLOURS,
    NOTO_EMOJI_FONT,
    SHAPES,
    CaptionFolder,
    EmojiDataset,
    ImageTransform,
    MetadataImageFolder,
    ShapesDataset,
    TarShards,
    caption_scene,
    collate_text_image,
    emoji_entries,
    expand_braces,
    sample_scene,
    scene_labels,
)
from trajflow.data.images import from_unit_range, to_unit_range

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COUNTS = {"a": 1, "two": 2, "three": 3, "four": 4}


# ------------------------------------------------------------------------------------------------ shapes
def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(length=20, seed=3), ShapesDataset(length=20, seed=3)
    for i in (0, 7, 19):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["objects"] == b[i]["objects"]
    # Random access order does not matter: item 7 is the same whether or not 0..6 were read first.
    assert ShapesDataset(length=20, seed=3)[7]["caption"] == a[7]["caption"]
    c = ShapesDataset(length=20, seed=4)
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(20))


@pytest.mark.parametrize("res", [16, 32, 64])
def test_shapes_resolution_and_formats(res):
    x = ShapesDataset(length=4, resolution=res)[1]["image"]
    assert x.shape == (3, res, res) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    u = ShapesDataset(length=4, resolution=res, image_format="uint8")[1]["image"]
    assert u.dtype == torch.uint8 and torch.equal(to_unit_range(u), x)
    assert torch.equal(from_unit_range(x), u)


def test_shapes_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match=r"resolution: expected an integer in 16\.\.64, got 8"):
        ShapesDataset(resolution=8)
    with pytest.raises(ValueError, match="shapes: expected"):
        ShapesDataset(shapes=("hexagon",))
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(grid=2, max_objects=5)
    with pytest.raises(ValueError, match="grid"):
        ShapesDataset(grid=4)


def _caption_groups(caption: str) -> list[tuple[int, str, str, str]]:
    pattern = r"\b(a|two|three|four) (small|large) (\w+) (\w+)"
    out = []
    for count, size, colour, noun in re.findall(pattern, caption):
        out.append((COUNTS[count], size, colour, noun))
    return out


def test_shapes_caption_agrees_with_ground_truth():
    ds = ShapesDataset(length=300, resolution=32, max_objects=4, shapes=tuple(SHAPES), seed=11)
    seen_counts = set()
    for i in range(len(ds)):
        item = ds[i]
        caption, objects = item["caption"], item["objects"]
        groups = _caption_groups(caption)
        # Counts in the caption add up to the number of objects, group by group.
        assert sum(g[0] for g in groups) == len(objects), caption
        for count, size, colour, noun in groups:
            shape = noun if count == 1 else next(s for s, p in SHAPES.items() if p == noun)
            matching = [o for o in objects if (o["shape"], o["colour"], o["size"]) == (shape, colour, size)]
            assert len(matching) == count, caption
            seen_counts.add(count)
        # Every object's slot is named, and slots are distinct (objects never share a cell).
        for o in objects:
            assert o["slot"] in caption
        assert len({o["slot_index"] for o in objects}) == len(objects)
    assert {1, 2, 3} <= seen_counts


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    index=st.integers(0, 10_000),
    grid=st.sampled_from([2, 3]),
    max_objects=st.integers(1, 4),
    max_groups=st.integers(1, 3),
)
def test_shapes_caption_counts_property(seed, index, grid, max_objects, max_groups):
    scene = sample_scene(
        np.random.default_rng([seed, index]),
        grid=grid,
        max_objects=max_objects,
        max_groups=max_groups,
        shapes=tuple(SHAPES),
    )
    caption = caption_scene(scene)
    assert sum(g[0] for g in _caption_groups(caption)) == len(scene["objects"])
    assert len({o["slot_index"] for o in scene["objects"]}) == len(scene["objects"])


def test_shapes_colours_present_in_pixels_at_their_slots():
    ds = ShapesDataset(length=60, resolution=64, max_objects=3, image_format="uint8", jitter=True, seed=5)
    n = ds.grid
    for i in range(len(ds)):
        item = ds[i]
        img = item["image"].permute(1, 2, 0).numpy().astype(int)
        res = img.shape[0]
        occupied = set()
        for o in item["objects"]:
            cx, cy = o["center"]
            # The object's own centre pixel carries its colour (all shapes cover their centre).
            px = img[int(cy * res), int(cx * res)]
            assert np.abs(px - COLOURS[o["colour"]]).max() <= 12, (item["caption"], o, px)
            # ... and it lies inside its slot's cell.
            assert int(cx * n) == o["col"] and int(cy * n) == o["row"]
            occupied.add(o["slot_index"])
        bg = np.array(BACKGROUNDS[item["background"]])
        for s in set(range(n * n)) - occupied:
            r, c = divmod(s, n)
            cell = img[r * res // n : (r + 1) * res // n, c * res // n : (c + 1) * res // n]
            assert np.abs(cell - bg).max() == 0, f"slot {s} of item {i} is not empty"


def test_shapes_labels_and_vocabulary():
    ds = ShapesDataset(length=30, max_objects=3, seed=2)
    vocab = ds.vocabulary
    assert vocab["slot"][4] == "center" and vocab["count"] == ["0", "1", "2", "3"]
    for i in range(len(ds)):
        item = ds[i]
        labels = item["labels"]
        assert labels.shape == (9, 3)
        assert int((labels[:, 0] > 0).sum()) == len(item["objects"])
        for o in item["objects"]:
            shape, colour, size = labels[o["slot_index"]].tolist()
            assert vocab["shape"][shape - 1] == o["shape"] and vocab["colour"][colour - 1] == o["colour"]
            assert vocab["size"][size - 1] == o["size"]
    assert torch.equal(scene_labels(ds.scene(3), vocab), ds[3]["labels"])


def test_shapes_caption_wording():
    objs = [
        {"shape": "circle", "colour": "red", "size": "small", "slot": "top left", "slot_index": 0},
        {"shape": "circle", "colour": "red", "size": "small", "slot": "bottom right", "slot_index": 8},
        {"shape": "square", "colour": "blue", "size": "large", "slot": "left", "slot_index": 3},
    ]
    text = caption_scene({"background": "gray", "objects": objs}, background=True)
    assert text == (
        "two small red circles at the top left and the bottom right and a large blue square on the left "
        "on a gray background"
    )


def test_shapes_batches_with_collate():
    loader = DataLoader(ShapesDataset(length=10, resolution=16), batch_size=5, collate_fn=collate_text_image)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["labels"].shape == (5, 9, 3)
    assert len(batch["caption"]) == 5 and all(isinstance(c, str) for c in batch["caption"])


# ------------------------------------------------------------------------------------------------ emoji
needs_emoji = pytest.mark.skipif(
    not Path(NOTO_EMOJI_FONT).is_file() or __import__("importlib").util.find_spec("emoji") is None,
    reason="needs Debian fonts-noto-color-emoji and pip emoji",
)


@needs_emoji
def test_emoji_renders_captions_and_caches(tmp_path):
    t0 = time.perf_counter()
    ds = EmojiDataset(resolution=32, limit=300, cache_dir=tmp_path)
    first = time.perf_counter() - t0
    assert len(ds) == 300 and ds.cache_path is not None and ds.cache_path.is_file()
    # Written atomically: the cache folder holds the finished file and no temporary left-over.
    assert [p.name for p in tmp_path.iterdir()] == [ds.cache_path.name]
    assert all(isinstance(c, str) and c.strip() for c in ds.captions)
    item = ds[10]
    assert item["image"].shape == (3, 32, 32) and -1 <= float(item["image"].min()) <= float(item["image"].max()) <= 1
    # Not blank: an emoji on white differs from plain white somewhere.
    assert float(item["image"].min()) < 0.5
    t0 = time.perf_counter()
    again = EmojiDataset(resolution=32, limit=300, cache_dir=tmp_path, image_format="uint8")
    second = time.perf_counter() - t0
    assert again.captions == ds.captions and np.array_equal(again.images, ds.images)
    assert again[10]["image"].dtype == torch.uint8
    assert second < first


@needs_emoji
def test_emoji_entries_flags_and_qualification():
    entries = dict(emoji_entries())
    assert entries["\U0001f1ef\U0001f1f5"] == "flag of Japan"
    assert entries["\U0001f600"] == "grinning face"
    assert len(dict(emoji_entries(skin_tones=False))) < len(entries)


def test_emoji_missing_font_names_debian_package(tmp_path):
    pytest.importorskip("emoji")
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        EmojiDataset(font_path=tmp_path / "nope.ttf", cache_dir=tmp_path)


def test_emoji_missing_package_names_pip_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "emoji", None)  # makes "import emoji" raise ImportError
    with pytest.raises(ImportError, match="pip install emoji"):
        EmojiDataset(cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- user folders
def _png(colour=(200, 30, 30), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n" + b"this is not a png at all" * 4


def _caption_folder(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, where in enumerate(["", "sub", "sub/deeper", ""]):
        (root / where / f"img{i}.png").write_bytes(_png((40 * i, 10, 10)))
        (root / where / f"img{i}.txt").write_text(f"  caption {i}\n")
    (root / "sub" / "broken.png").write_bytes(CORRUPT)
    (root / "sub" / "broken.txt").write_text("a broken image")
    (root / "nocap.png").write_bytes(_png())  # no nocap.txt


def test_caption_folder_skips_and_counts(tmp_path):
    _caption_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match="missing caption"):
        ds = CaptionFolder(tmp_path, transform=ImageTransform(8))
    assert len(ds) == 5  # 4 good + the corrupt one (found lazily); nocap.png left out when built
    assert ds.stats["missing_caption"] == 1 and ds.stats["corrupt_image"] == 0
    captions = []
    with pytest.warns(RuntimeWarning, match="cannot decode"):
        for i in range(len(ds)):
            item = ds[i]  # never raises
            assert item["image"].shape == (3, 8, 8)
            assert float(item["image"].abs().max()) <= 1.0
            captions.append(item["caption"])
    assert set(captions) == {f"caption {i}" for i in range(4)}
    assert ds.stats["corrupt_image"] == 1 and ds.skipped == 2
    assert any(p.endswith("broken.png") for p in ds.skipped_files)
    # Reading the bad index again substitutes silently and does not count twice.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(len(ds)):
            ds[i]
    assert ds.skipped == 2


def test_caption_folder_scan_and_non_recursive(tmp_path):
    _caption_folder(tmp_path)
    with pytest.warns(RuntimeWarning):
        ds = CaptionFolder(tmp_path, transform=8, validate="scan")
    assert ds.stats["corrupt_image"] == 1 and ds.stats["checked_ok"] == 4
    with pytest.warns(RuntimeWarning):
        top = CaptionFolder(tmp_path, recursive=False)
    assert len(top) == 2
    with pytest.raises(ValueError, match="validate"):
        CaptionFolder(tmp_path, validate="eager")
    with pytest.raises(ValueError, match="root: expected an existing folder"):
        CaptionFolder(tmp_path / "missing")


def test_caption_folder_counts_are_shared_with_workers(tmp_path):
    _caption_folder(tmp_path)
    with pytest.warns(RuntimeWarning):
        ds = CaptionFolder(tmp_path, transform=8)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_text_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b["caption"]) for b in loader)
    assert n == len(ds)
    # The corrupt file was met in a worker process; the main process sees the count.
    assert ds.stats["corrupt_image"] == 1 and ds.skipped == 2


def test_metadata_folder(tmp_path):
    (tmp_path / "train").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "train" / f"{i}.png").write_bytes(_png())
        rows.append({"file_name": f"{i}.png", "caption": f"red {i}", "other": 1})
    (tmp_path / "train" / "bad.png").write_bytes(CORRUPT)
    rows.append({"file_name": "bad.png", "caption": "corrupt"})
    (tmp_path / "train" / "x.png").write_bytes(_png())
    rows += [
        {"file_name": "x.png"},  # no caption column
        {"file_name": "x.png", "caption": "   "},  # empty caption
        {"file_name": "gone.png", "caption": "missing image"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]"]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "top.png").write_bytes(_png((0, 0, 250)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "top.png", "caption": "blue"}) + "\n")

    with pytest.warns(RuntimeWarning):
        ds = MetadataImageFolder(tmp_path, transform=8, caption_column="caption")
    assert len(ds) == 5
    assert ds.stats["missing_caption"] == 2 and ds.stats["missing_image"] == 1 and ds.stats["bad_metadata"] == 2
    with pytest.warns(RuntimeWarning, match="cannot decode"):
        caps = sorted(ds[i]["caption"] for i in range(len(ds)))
    assert "corrupt" not in caps and set(caps) == {"blue", "red 0", "red 1", "red 2"}
    assert ds.stats["corrupt_image"] == 1 and ds.skipped == 6
    with pytest.raises(ValueError, match="caption_column: expected a key present in metadata.jsonl, got 'text'"):
        MetadataImageFolder(tmp_path)


def test_image_transform():
    img = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3))
    out = ImageTransform(10)(img)
    assert out.shape == (3, 10, 10)
    flipped = ImageTransform(10, hflip=1.0)(img)
    assert torch.equal(flipped, out.flip(-1))
    g = torch.Generator().manual_seed(0)
    crops = {tuple(ImageTransform(10, crop="random", generator=g)(img)[0, 0, :3].tolist()) for _ in range(12)}
    assert len(crops) > 1
    assert ImageTransform(None)(img).shape == (3, 20, 30)
    with pytest.raises(ValueError, match="crop: expected 'center' or 'random', got 'middle'"):
        ImageTransform(8, crop="middle")
    # Transparent pixels are composited onto white, not left as their hidden colour.
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")
    from examples.t2i.data import load_rgb

    assert load_rgb(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------ tar shards
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root: Path, n_shards: int = 4, per_shard: int = 5, bad: bool = True) -> list[str]:
    keys = []
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s}/{j:04d}"
                if bad and (s, j) == (1, 2):
                    _add(tar, key + ".png", CORRUPT)
                    _add(tar, key + ".txt", b"corrupt")
                    continue
                if bad and (s, j) == (2, 0):
                    _add(tar, key + ".jpg", _png())  # no caption
                    continue
                _add(tar, key + ".txt", f"sample {key}".encode())
                _add(tar, key + ".png", _png((10 * j, 10 * s, 0)))
                keys.append(key)
    return keys


def test_expand_braces():
    assert expand_braces("a-{000..003}.tar") == [f"a-{i:03d}.tar" for i in range(4)]
    assert expand_braces("x{1..3}") == ["x1", "x2", "x3"]
    assert expand_braces("{a,b{1..2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="pattern: expected balanced braces"):
        expand_braces("a{1..2.tar")


def test_tar_shards_stream_and_skip(tmp_path):
    keys = _shards(tmp_path)
    ds = TarShards(str(tmp_path / "shard-{000..003}.tar"), transform=8)
    with pytest.warns(RuntimeWarning):
        items = list(ds)
    assert sorted(i["key"] for i in items) == sorted(keys)
    assert all(i["caption"] == f"sample {i['key']}" and i["image"].shape == (3, 8, 8) for i in items)
    assert ds.stats == {
        "samples": 18,
        "corrupt_image": 1,
        "missing_caption": 1,
        "missing_image": 0,
        "bad_shard": 0,
    }
    assert ds.skipped == 2


def test_tar_shards_split_across_two_workers(tmp_path):
    keys = _shards(tmp_path)
    ds = TarShards(str(tmp_path / "shard-{000..003}.tar"), transform=8, shuffle=True, shuffle_buffer=3, seed=1)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_text_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = [k for b in loader for k in b["key"]]
    assert sorted(seen) == sorted(keys)  # every sample exactly once
    assert ds.stats["samples"] == len(keys) and ds.skipped == 2  # counted in the workers, read here


def test_tar_shards_split_by_rank_and_by_sample(tmp_path):
    keys = _shards(tmp_path, bad=False)
    pattern = str(tmp_path / "shard-{000..003}.tar")
    parts = [[i["key"] for i in TarShards(pattern, transform=4, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(keys)
    # One shard, two workers: "auto" falls back to splitting samples, still each once.
    one = TarShards(str(tmp_path / "shard-000.tar"), transform=4)
    seen = [k for b in DataLoader(one, batch_size=2, num_workers=2, collate_fn=collate_text_image) for k in b["key"]]
    assert sorted(seen) == sorted(k for k in keys if k.startswith("s0/"))
    with pytest.raises(ValueError, match="rank: expected an integer in 0..1, got 2"):
        TarShards(pattern, rank=2, world_size=2)


def test_tar_shards_shuffle_epochs_and_bad_shards(tmp_path):
    keys = _shards(tmp_path, bad=False)
    ds = TarShards(str(tmp_path / "shard-{000..003}.tar"), transform=4, shuffle=True, shuffle_buffer=6)
    ds.set_epoch(0)
    e0 = [i["key"] for i in ds]
    ds.set_epoch(1)
    e1 = [i["key"] for i in ds]
    assert sorted(e0) == sorted(e1) == sorted(keys) and e0 != e1
    # A truncated shard yields what it can and is counted; the stream goes on to the next shard.
    data = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(data[:3000])  # cut inside a member, before the padding
    ds = TarShards(str(tmp_path / "shard-{000..003}.tar"), transform=4)
    with pytest.warns(RuntimeWarning, match="shard-001"):
        got = [i["key"] for i in ds]
    assert ds.stats["bad_shard"] == 1 and {k for k in keys if not k.startswith("s1/")} <= set(got)
    with pytest.raises(FileNotFoundError, match="6 of 10 shard files do not exist: .*shard-004.tar"):
        TarShards(str(tmp_path / "shard-{000..009}.tar"))
