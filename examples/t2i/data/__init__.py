"""The text-image data of the t2i lab: the datasets, the one a :class:`~examples.t2i.config.DataConfig` names
(:func:`build_dataset`, with :func:`dataset_captions` for the text cache) and the collate function that
batches any of them.

Every text-image dataset here yields dicts with at least ``"image"`` (a ``(3, H, W)`` tensor) and
``"caption"`` (a string); extra keys carry ground truth or provenance:

=============================  ===================================================  ==========================
dataset                        source                                               extra keys
=============================  ===================================================  ==========================
:class:`ShapesDataset`         procedural scenes, exact ground truth                ``objects``, ``labels``
:class:`EmojiDataset`          Noto Color Emoji + names from ``emoji``              ``emoji``
:class:`CaptionFolder`         ``cat.png`` + ``cat.txt``                            ``path``
:class:`MetadataImageFolder`   images + ``metadata.jsonl``                          ``path``
:class:`TarShards`             webdataset-style tar shards, streamed                ``key``, ``shard``
=============================  ===================================================  ==========================

Example:
    >>> from torch.utils.data import DataLoader
    >>> ds = ShapesDataset(length=8, resolution=16)
    >>> loader = DataLoader(ds, batch_size=4, collate_fn=collate_text_image)
    >>> batch = next(iter(loader))
    >>> tuple(batch["image"].shape), len(batch["caption"]), len(batch["objects"])
    ((4, 3, 16, 16), 4, 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from examples.t2i.config import DataConfig
from examples.t2i.data.caption_folder import IMAGE_EXTENSIONS, CaptionFolder, MetadataImageFolder
from examples.t2i.data.emoji_set import NOTO_EMOJI_FONT, EmojiDataset, default_cache_dir, emoji_entries
from examples.t2i.data.images import ImageTransform, load_rgb, pil_to_tensor
from examples.t2i.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_SHAPES,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption_scene,
    render_scene,
    sample_scene,
    scene_labels,
    slot_names,
)
from examples.t2i.data.skips import SkipCounter
from examples.t2i.data.tar_shards import TarShards, expand_braces

__all__ = [
    "build_dataset",
    "dataset_captions",
    "collate_text_image",
    # re-exported from the modules that define them
    "ShapesDataset",
    "SHAPES",
    "DEFAULT_SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "SIZES",
    "slot_names",
    "sample_scene",
    "caption_scene",
    "render_scene",
    "scene_labels",
    "EmojiDataset",
    "NOTO_EMOJI_FONT",
    "emoji_entries",
    "default_cache_dir",
    "CaptionFolder",
    "MetadataImageFolder",
    "IMAGE_EXTENSIONS",
    "TarShards",
    "expand_braces",
    "ImageTransform",
    "load_rgb",
    "pil_to_tensor",
    "SkipCounter",
]


def build_dataset(config: DataConfig, *, seed: int | None = None, length: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names; ``seed``/``length`` override the shapes generator's
    (evaluation draws held-out scenes this way)."""
    res = config.resolution
    if config.name == "shapes":
        kwargs: dict[str, Any] = {}
        for name in ("shapes", "colours", "sizes", "backgrounds"):
            if getattr(config, name) is not None:
                kwargs[name] = tuple(getattr(config, name))
        return ShapesDataset(
            length=config.length if length is None else length,
            resolution=res,
            seed=config.seed if seed is None else seed,
            grid=config.grid,
            max_objects=config.max_objects,
            max_groups=config.max_groups,
            **kwargs,
        )
    if config.name == "emoji":
        return EmojiDataset(resolution=res, skin_tones=config.emoji_skin_tones, limit=config.emoji_limit)
    transform = ImageTransform(res, crop=config.crop, hflip=config.hflip)
    if config.name == "caption_folder":
        return CaptionFolder(config.path, transform)
    if config.name == "metadata_folder":
        return MetadataImageFolder(config.path, transform, caption_column=config.caption_column)
    return TarShards(config.path, transform, shuffle=True, shuffle_buffer=config.shuffle_buffer, seed=config.seed)


def dataset_captions(dataset: Dataset) -> list[str] | None:
    """Every caption of a map-style dataset, read cheaply where the dataset allows it (no image decoding);
    ``None`` for streams and datasets that can only give captions with their images."""
    if isinstance(dataset, ShapesDataset):
        return [dataset.caption(dataset.scene(i)) for i in range(len(dataset))]
    if isinstance(dataset, EmojiDataset):
        return list(dataset.captions)
    return None


def collate_text_image(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch text-image items: tensors of one shape are stacked, everything else becomes a list.

    Unlike torch's ``default_collate`` it accepts per-item lists of different lengths (the ground-truth
    ``objects`` of :class:`ShapesDataset`), and it never turns strings into anything but a list of strings.

    Example:
        >>> b = collate_text_image([{"image": torch.zeros(3, 2, 2), "caption": "a", "objects": [1]},
        ...                         {"image": torch.ones(3, 2, 2), "caption": "b", "objects": [1, 2]}])
        >>> tuple(b["image"].shape), b["caption"], b["objects"]
        ((2, 3, 2, 2), ['a', 'b'], [[1], [1, 2]])
    """
    if len(batch) == 0:
        raise ValueError("batch: expected at least one item, got an empty sequence")
    keys = batch[0].keys()
    for item in batch[1:]:
        if item.keys() != keys:
            raise ValueError(f"batch: expected every item to have keys {sorted(keys)}, got {sorted(item.keys())}")
    out: dict[str, Any] = {}
    for k in keys:
        values = [item[k] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor) and all(
            isinstance(v, torch.Tensor) and v.shape == first.shape for v in values
        ):
            out[k] = torch.stack(values)
        else:
            out[k] = values
    return out
