"""Procedural shapes with compositional captions: a text-image set whose generator knows every image's truth.

Each scene places one or more coloured shapes in the cells of a ``grid x grid`` layout (one object per cell,
so objects never overlap and a caption's position words are always exact), and describes it with counts,
sizes, colours and positions: "two small red circles at the top left and the center and a large blue square
at the bottom right". Scenes are drawn at 4x the output resolution and box-filtered down, which antialiases
edges.

Everything about item ``i`` is a function of ``(seed, i)`` alone, so items can be read in any order, from any
worker, and an evaluator can regenerate the ground truth of any caption it was conditioned on.

Example:
    >>> ds = ShapesDataset(length=4, resolution=32, seed=0)
    >>> item = ds[0]
    >>> item["image"].shape, item["image"].dtype
    (torch.Size([3, 32, 32]), torch.float32)
    >>> isinstance(item["caption"], str) and len(item["objects"]) >= 1
    True
    >>> ds[0]["caption"] == ShapesDataset(length=4, resolution=32, seed=0)[0]["caption"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from trajflow.data.images import to_unit_range

__all__ = [
    "SHAPES",
    "DEFAULT_SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "SIZES",
    "COUNT_WORDS",
    "slot_names",
    "sample_scene",
    "caption_scene",
    "render_scene",
    "scene_labels",
    "ShapesDataset",
]

#: Every shape the renderer can draw, with its plural for captions.
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
#: The shapes used unless ``shapes=`` says otherwise: the four that stay distinguishable at 16-32 px.
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: Object colours, picked to be far apart in hue so that a small classifier can read them back.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "orange": (250, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
#: Background colours. An object colour equal to the background's name is never used on it (white on white).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "white": (255, 255, 255),
}
#: Size name -> extent of the object as a fraction of its grid cell.
SIZES: dict[str, float] = {"small": 0.45, "large": 0.8}

COUNT_WORDS: tuple[str, ...] = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_SLOT_NAMES = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
}
# Fraction of the cell that an object (with its jitter) may use, so that objects in neighbouring cells keep
# a visible gap between them.
_CELL_USE = 0.92
_SUPERSAMPLE = 4


def slot_names(grid: int) -> tuple[str, ...]:
    """Names of the cells of a ``grid x grid`` layout in reading order (row-major).

    Example:
        >>> slot_names(2)
        ('top left', 'top right', 'bottom left', 'bottom right')
    """
    if grid not in _SLOT_NAMES:
        raise ValueError(f"grid: expected one of {sorted(_SLOT_NAMES)}, got {grid!r}")
    return _SLOT_NAMES[grid]


def _slot_phrase(slot: str) -> str:
    # "on the left" reads better than "at the left"; every other slot takes "at the".
    return f"on the {slot}" if slot in ("left", "right") else f"at the {slot}"


def sample_scene(
    rng: np.random.Generator,
    *,
    grid: int = 3,
    max_objects: int = 2,
    max_groups: int = 2,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = tuple(SIZES),
    backgrounds: Sequence[str] = ("black",),
    jitter: bool = True,
) -> dict[str, Any]:
    """Draw a random scene: ``{"background": str, "objects": [{"shape", "colour", "size", "slot", ...}]}``.

    The number of objects is uniform in ``1..max_objects``; they form up to ``max_groups`` groups of identical
    objects (same shape, colour and size, e.g. "two red circles"), and the groups differ from each other, so
    the caption names each object exactly once. Objects are listed in reading order of their slots. Positions
    in ``"center"`` are unit-free fractions of the image (``(x, y)`` in ``[0, 1]``), as is ``"extent"``.

    Example:
        >>> scene = sample_scene(np.random.default_rng(0))
        >>> 1 <= len(scene["objects"]) <= 2
        True
    """
    names = slot_names(grid)
    if not 1 <= max_objects <= len(names):
        raise ValueError(f"max_objects: expected an integer in 1..{len(names)} for grid={grid}, got {max_objects}")
    if max_groups < 1:
        raise ValueError(f"max_groups: expected an integer >= 1, got {max_groups}")
    bg = str(backgrounds[rng.integers(len(backgrounds))])
    usable = [c for c in colours if c != bg]
    n = int(rng.integers(1, max_objects + 1))
    n_groups = int(rng.integers(1, min(n, max_groups) + 1))
    n_kinds = len(shapes) * len(usable) * len(sizes)
    if n_groups > n_kinds:  # not enough distinct kinds: the loop below would never finish
        raise ValueError(
            f"max_groups: expected at most {n_kinds} distinct (shape, colour, size) kinds on a {bg} "
            f"background, got {max_groups}"
        )
    # Split n objects into n_groups non-empty groups: choose n_groups - 1 distinct cut points in 1..n-1.
    cuts = sorted(rng.choice(np.arange(1, n), size=n_groups - 1, replace=False).tolist()) if n_groups > 1 else []
    counts = np.diff([0, *cuts, n]).tolist()
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n_groups:
        kind = (
            str(shapes[rng.integers(len(shapes))]),
            str(usable[rng.integers(len(usable))]),
            str(sizes[rng.integers(len(sizes))]),
        )
        if kind not in kinds:  # distinct groups, so that "a red circle and a red circle" never happens
            kinds.append(kind)
    slots = rng.permutation(len(names))[:n].tolist()
    objects = []
    i = 0
    for (shape, colour, size), count in zip(kinds, counts):
        for _ in range(count):
            s = slots[i]
            i += 1
            row, col = divmod(s, grid)
            extent = SIZES[size] / grid
            # Jitter moves the object inside its cell but never past _CELL_USE of it.
            room = max(0.0, (_CELL_USE / grid - extent) / 2) if jitter else 0.0
            dx, dy = rng.uniform(-room, room, size=2) if room > 0 else (0.0, 0.0)
            cx, cy = (col + 0.5) / grid + dx, (row + 0.5) / grid + dy
            objects.append(
                {
                    "shape": shape,
                    "colour": colour,
                    "size": size,
                    "slot": names[s],
                    "slot_index": s,
                    "row": row,
                    "col": col,
                    "center": (float(cx), float(cy)),
                    "extent": float(extent),
                }
            )
    objects.sort(key=lambda o: o["slot_index"])
    return {"background": bg, "objects": objects}


def caption_scene(scene: dict[str, Any], *, positions: bool = True, background: bool = False) -> str:
    """Describe a scene: groups of identical objects with a count, in reading order of their first slot.

    Example:
        >>> scene = {"background": "black", "objects": [
        ...     {"shape": "circle", "colour": "red", "size": "small", "slot": "top left", "slot_index": 0},
        ...     {"shape": "square", "colour": "blue", "size": "large", "slot": "bottom right",
        ...      "slot_index": 8}]}
        >>> caption_scene(scene)
        'a small red circle at the top left and a large blue square at the bottom right'
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for o in sorted(scene["objects"], key=lambda o: o["slot_index"]):
        groups.setdefault((o["shape"], o["colour"], o["size"]), []).append(o)
    phrases = []
    for (shape, colour, size), objs in groups.items():
        n = len(objs)
        if n >= len(COUNT_WORDS):
            raise ValueError(f"scene: expected at most {len(COUNT_WORDS) - 1} identical objects, got {n}")
        noun = shape if n == 1 else SHAPES[shape]
        phrase = f"{COUNT_WORDS[n]} {size} {colour} {noun}"
        if positions:
            where = [_slot_phrase(o["slot"]) for o in objs]
            # "at the top left and at the center" -> "at the top left and the center" when prepositions agree.
            if len({w.split(" the ")[0] for w in where}) == 1 and n > 1:
                prep = where[0].split(" the ")[0]
                slots = [f"the {o['slot']}" for o in objs]
                where = [f"{prep} {_join(slots)}"]
            phrase += " " + _join(where)
        phrases.append(phrase)
    text = _join(phrases)
    if background:
        text += f" on a {scene['background']} background"
    return text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        # Upward triangle filling the box, shifted down a little so its visual centre sits on (cx, cy).
        return [(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else 0.45 * h
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a) + 0.1 * h))
        return pts
    raise ValueError(f"shape: expected one of {sorted(SHAPES)}, got {shape!r}")


def render_scene(scene: dict[str, Any], resolution: int) -> np.ndarray:
    """Render a scene to a ``(resolution, resolution, 3)`` uint8 array (drawn at 4x, box-filtered down).

    Example:
        >>> img = render_scene(sample_scene(np.random.default_rng(0)), 16)
        >>> img.shape, img.dtype
        ((16, 16, 3), dtype('uint8'))
    """
    s = resolution * _SUPERSAMPLE
    im = Image.new("RGB", (s, s), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(im)
    for o in scene["objects"]:
        fill = COLOURS[o["colour"]]
        cx, cy = o["center"][0] * s, o["center"][1] * s
        h = o["extent"] * s / 2
        shape = o["shape"]
        if shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif shape == "square":
            # A square of the same extent looks bigger than the circle; 0.88 evens out their areas a little.
            q = 0.88 * h
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        elif shape == "cross":
            w = 0.33 * h
            draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, h), fill=fill)
    # reduce() averages each 4x4 block (a box filter): antialiased edges and no ringing around flat colours.
    return np.asarray(im.reduce(_SUPERSAMPLE), dtype=np.uint8)


def scene_labels(scene: dict[str, Any], vocabulary: dict[str, list[str]]) -> Tensor:
    """Per-slot class labels ``(num_slots, 3)``: ``[shape, colour, size]``, each ``0`` for an empty slot and
    ``1 + index`` into ``vocabulary[...]`` otherwise; a classifier trained on them reads images back.

    Example:
        >>> ds = ShapesDataset(length=1, grid=2)
        >>> scene_labels(ds.scene(0), ds.vocabulary).shape
        torch.Size([4, 3])
    """
    out = torch.zeros(len(vocabulary["slot"]), 3, dtype=torch.long)
    for o in scene["objects"]:
        out[o["slot_index"]] = torch.tensor(
            [
                vocabulary["shape"].index(o["shape"]) + 1,
                vocabulary["colour"].index(o["colour"]) + 1,
                vocabulary["size"].index(o["size"]) + 1,
            ]
        )
    return out


def _check_subset(name: str, given: Sequence[str], allowed: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(given, str) or len(given) == 0 or any(g not in allowed for g in given):
        raise ValueError(f"{name}: expected a non-empty sequence of names from {list(allowed)}, got {given!r}")
    if len(set(given)) != len(given):
        raise ValueError(f"{name}: expected distinct names, got {given!r}")
    return tuple(given)


class ShapesDataset(Dataset):
    """Map-style dataset of procedural shape scenes with compositional captions and their ground truth.

    Item ``i`` is ``{"image", "caption", "objects", "labels", "background"}``:

    - ``image``: ``(3, H, W)`` float in ``[-1, 1]`` (``image_format="float"``: pixel bin centres, as
      :func:`trajflow.data.images.to_unit_range`) or uint8 (``"uint8"``, e.g. to dequantise for bits/dim);
    - ``caption``: e.g. ``"a small red circle at the top left and two large blue squares at the top and the
      center"``;
    - ``objects``: the ground truth, a list of dicts with ``shape``, ``colour``, ``size``, ``slot`` (name),
      ``slot_index``, ``row``, ``col``, ``center`` (fractions of the image) and ``extent``;
    - ``labels``: ``(num_slots, 3)`` long tensor from :func:`scene_labels` (0 = empty slot);
    - ``background``: the background colour's name.

    ``objects`` varies in length, so batch items with :func:`examples.t2i.data.collate_text_image`.

    Args:
        length: number of items.
        resolution: output side in pixels, 16..64 (drawn at 4x and box-filtered down).
        seed: item ``i`` is a function of ``(seed, i)`` only.
        grid: 2 (four corner slots) or 3 (a 3x3 grid of slots: top left ... bottom right).
        max_objects: objects per scene are uniform in ``1..max_objects``.
        max_groups: at most this many distinct kinds of object per scene; the rest are repeats, captioned
            with counts ("two red circles").
        shapes, colours, sizes, backgrounds: names from :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`,
            :data:`BACKGROUNDS`; with more than one background the caption ends with "on a ... background".
        positions_in_caption: say where each object is.
        jitter: move each object randomly inside its cell (it never leaves the cell).
        image_format: ``"float"`` or ``"uint8"``.

    Example:
        >>> ds = ShapesDataset(length=8, resolution=16, max_objects=3, seed=1)
        >>> ds.vocabulary["slot"][:3]
        ['top left', 'top', 'top right']
        >>> ds[3]["labels"].shape
        torch.Size([9, 3])
    """

    def __init__(
        self,
        length: int = 10_000,
        resolution: int = 32,
        *,
        seed: int = 0,
        grid: int = 3,
        max_objects: int = 2,
        max_groups: int = 2,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        colours: Sequence[str] = tuple(COLOURS),
        sizes: Sequence[str] = tuple(SIZES),
        backgrounds: Sequence[str] = ("black",),
        positions_in_caption: bool = True,
        jitter: bool = True,
        image_format: str = "float",
    ) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected a positive integer, got {length!r}")
        if not isinstance(resolution, int) or not 16 <= resolution <= 64:
            raise ValueError(f"resolution: expected an integer in 16..64, got {resolution!r}")
        if image_format not in ("float", "uint8"):
            raise ValueError(f"image_format: expected 'float' or 'uint8', got {image_format!r}")
        names = slot_names(grid)
        if not isinstance(max_objects, int) or not 1 <= max_objects <= len(names):
            raise ValueError(
                f"max_objects: expected an integer in 1..{len(names)} for grid={grid}, got {max_objects!r}"
            )
        if not isinstance(max_groups, int) or max_groups < 1:
            raise ValueError(f"max_groups: expected an integer >= 1, got {max_groups!r}")
        self.shapes = _check_subset("shapes", shapes, SHAPES)
        self.colours = _check_subset("colours", colours, COLOURS)
        self.sizes = _check_subset("sizes", sizes, SIZES)
        self.backgrounds = _check_subset("backgrounds", backgrounds, BACKGROUNDS)
        for bg in self.backgrounds:
            if len([c for c in self.colours if c != bg]) == 0:
                raise ValueError(f"colours: expected a colour other than the background {bg!r}, got {colours!r}")
        # Enough distinct (shape, colour, size) kinds for max_groups groups, or sample_scene would loop.
        n_kinds = len(self.shapes) * (len(self.colours) - 1) * len(self.sizes)
        if min(max_groups, max_objects) > max(n_kinds, 1):
            raise ValueError(f"max_groups: expected at most {n_kinds} distinct kinds of object, got {max_groups}")
        self.length = length
        self.resolution = resolution
        self.seed = int(seed)
        self.grid = grid
        self.max_objects = max_objects
        self.max_groups = max_groups
        self.positions_in_caption = positions_in_caption
        self.jitter = jitter
        self.image_format = image_format

    @property
    def vocabulary(self) -> dict[str, list[str]]:
        """Label names for a read-back classifier: ``shape``, ``colour``, ``size``, ``slot``, ``background``,
        and ``count`` (``"0"`` .. ``str(max_objects)``); :func:`scene_labels` indexes into these lists."""
        return {
            "shape": list(self.shapes),
            "colour": list(self.colours),
            "size": list(self.sizes),
            "slot": list(slot_names(self.grid)),
            "background": list(self.backgrounds),
            "count": [str(k) for k in range(self.max_objects + 1)],
        }

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        return i % self.length

    def scene(self, i: int) -> dict[str, Any]:
        """The ground truth of item ``i`` (background and objects) without rendering it."""
        # A generator per item keyed by (seed, i): items are independent of access order and of workers.
        rng = np.random.default_rng([self.seed, self._index(i)])
        return sample_scene(
            rng,
            grid=self.grid,
            max_objects=self.max_objects,
            max_groups=self.max_groups,
            shapes=self.shapes,
            colours=self.colours,
            sizes=self.sizes,
            backgrounds=self.backgrounds,
            jitter=self.jitter,
        )

    def caption(self, scene: dict[str, Any]) -> str:
        """The caption this dataset gives ``scene``."""
        return caption_scene(scene, positions=self.positions_in_caption, background=len(self.backgrounds) > 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.scene(i)
        arr = render_scene(scene, self.resolution)
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        if self.image_format == "float":
            img = to_unit_range(img)
        return {
            "image": img,
            "caption": self.caption(scene),
            "objects": scene["objects"],
            "labels": scene_labels(scene, self.vocabulary),
            "background": scene["background"],
        }

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(length={self.length}, resolution={self.resolution}, seed={self.seed}, "
            f"grid={self.grid}, max_objects={self.max_objects}, shapes={list(self.shapes)})"
        )
