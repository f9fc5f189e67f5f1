"""Text-image datasets in one place, and the collate function that batches any of them.

Every text-image dataset in trajflow yields dicts with at least ``"image"`` (a ``(3, H, W)`` tensor) and
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

from trajflow.data.caption_folder import IMAGE_EXTENSIONS, CaptionFolder, MetadataImageFolder
from trajflow.data.emoji_set import NOTO_EMOJI_FONT, EmojiDataset, default_cache_dir, emoji_entries
from trajflow.data.image_transforms import ImageTransform, load_rgb, pil_to_tensor
from trajflow.data.shapes import (
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
from trajflow.data.skips import SkipCounter
from trajflow.data.tar_shards import TarShards, expand_braces

__all__ = [
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
