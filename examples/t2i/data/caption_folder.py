"""User text-image data on disk: images with ``.txt`` captions beside them, or a ``metadata.jsonl`` folder.

Two map-style datasets share one way of handling bad files:

- :class:`CaptionFolder`: ``cat.png`` + ``cat.txt``, searched recursively.
- :class:`MetadataImageFolder`: a Hugging Face ``imagefolder``-style tree with ``metadata.jsonl`` files
  (one JSON object per line, ``file_name`` relative to that file's folder, and a caption column), read here
  without the ``datasets`` package.

Bad samples never stop an epoch. What can be checked cheaply (a caption file or metadata row that is missing,
an image path that does not exist, a malformed JSON line) is checked when the dataset is built, and those
samples are left out, counted and reported in one warning. Decoding every image up front would take as long
as an epoch, so a corrupt image or an unreadable/empty caption file is found **lazily**: ``__getitem__``
warns, marks the index bad (in shared memory, so every worker then skips it), counts it once, and returns
the next good index instead (``i + 1``, ``i + 2``, ... wrapping around). The epoch keeps its length, and the
neighbour is read twice that epoch. Pass ``validate="scan"`` to decode everything when the dataset is built
instead, so that ``stats`` is complete before training and ``__getitem__`` never substitutes.

Counts are in ``stats`` (a dict) and ``skipped`` (their total), readable from the main process while
DataLoader workers run; the paths are in ``skipped_files`` (lazy ones only as seen by this process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from examples.t2i.data.images import ImageTransform, load_rgb
from examples.t2i.data.skips import warn_skip

__all__ = ["IMAGE_EXTENSIONS", "CaptionFolder", "MetadataImageFolder"]

#: File endings treated as images (lower case; matching ignores case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Per-index status, kept in a shared uint8 tensor so that a bad index found by one worker is skipped by all.
_UNKNOWN, _OK, _CORRUPT, _NO_CAPTION = 0, 1, 2, 3

Transform = Callable[[Image.Image], Tensor]


class _Skip(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _make_transform(transform: int | Transform | None) -> Transform:
    if transform is None or isinstance(transform, int):
        return ImageTransform(transform)
    if not callable(transform):
        raise ValueError(f"transform: expected an int size, a callable or None, got {type(transform).__name__}")
    return transform


def _summarise(kind: str, paths: list[str]) -> None:
    if paths:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        warn_skip(f"{len(paths)} sample(s)", f"{kind}: {shown}")


class _CaptionedFiles(Dataset):
    """Base class: ``(image path, caption or caption file)`` records, with lazy skip-and-substitute."""

    def __init__(
        self,
        records: list[tuple[str, str | None, str | None]],
        transform: int | Transform | None,
        init_skips: dict[str, list[str]],
        validate: str,
    ) -> None:
        if validate not in ("lazy", "scan"):
            raise ValueError(f"validate: expected 'lazy' or 'scan', got {validate!r}")
        self.transform = _make_transform(transform)
        # (image path, caption text or None, caption file or None): exactly one of the last two is set.
        self.records = records
        self._init_skips = init_skips
        for kind, paths in init_skips.items():
            _summarise(kind.replace("_", " "), paths)
        self._status = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        self._lazy_skipped: list[str] = []
        if not records:
            raise ValueError(f"{type(self).__name__}: expected at least one usable sample, found none ({self.stats})")
        if validate == "scan":
            for i in range(len(records)):
                self._try(i)
            if not bool((self._status == _OK).any()):
                raise ValueError(f"{type(self).__name__}: every sample failed to load ({self.stats})")

    def __len__(self) -> int:
        return len(self.records)

    def _read_caption(self, i: int) -> str:
        _, text, caption_file = self.records[i]
        if text is None:
            try:
                text = Path(caption_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise _Skip(_NO_CAPTION, f"unreadable caption file {caption_file} ({e})") from e
        text = text.strip()
        if not text:
            raise _Skip(_NO_CAPTION, f"empty caption for {self.records[i][0]}")
        return text

    def _load(self, i: int) -> dict[str, Any]:
        path = self.records[i][0]
        caption = self._read_caption(i)
        try:
            img = load_rgb(path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files: skip them all
            raise _Skip(_CORRUPT, f"cannot decode image {path} ({type(e).__name__}: {e})") from e
        return {"image": self.transform(img), "caption": caption, "path": path}

    def _try(self, i: int) -> dict[str, Any] | None:
        try:
            item = self._load(i)
        except _Skip as s:
            # Another worker may have marked it already; count each bad file once.
            if int(self._status[i]) not in (_CORRUPT, _NO_CAPTION):
                self._status[i] = s.code
                self._lazy_skipped.append(self.records[i][0])
                warn_skip(self.records[i][0], str(s))
            return None
        self._status[i] = _OK
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        for k in range(n):
            j = (i + k) % n
            if int(self._status[j]) in (_CORRUPT, _NO_CAPTION):
                continue
            item = self._try(j)
            if item is not None:
                return item
        # Only reachable when every single file is bad: there is nothing to substitute.
        raise RuntimeError(f"{type(self).__name__}: every sample failed to load ({self.stats})")

    @property
    def stats(self) -> dict[str, int]:
        """Skipped samples by reason: ``corrupt_image``, ``missing_caption``, ``missing_image``,
        ``bad_metadata`` (each bad file counted once), and ``checked_ok``, the samples read successfully."""
        out = dict.fromkeys(("corrupt_image", "missing_caption", "missing_image", "bad_metadata"), 0)
        out.update({k: len(v) for k, v in self._init_skips.items()})
        out["corrupt_image"] += int((self._status == _CORRUPT).sum())
        out["missing_caption"] += int((self._status == _NO_CAPTION).sum())
        out["checked_ok"] = int((self._status == _OK).sum())
        return out

    @property
    def skipped(self) -> int:
        """How many samples were skipped so far (all reasons)."""
        return sum(v for k, v in self.stats.items() if k != "checked_ok")

    @property
    def skipped_files(self) -> list[str]:
        """Paths skipped when the dataset was built, plus those this process found bad since."""
        return [p for paths in self._init_skips.values() for p in paths] + list(self._lazy_skipped)


class CaptionFolder(_CaptionedFiles):
    """Images with a caption file beside them (``a/cat.png`` + ``a/cat.txt``), found recursively.

    Items are ``{"image": (3, H, W) float in [-1, 1], "caption": str, "path": str}``. An image without its
    caption file is left out when the dataset is built (counted as ``missing_caption``); see the module
    docstring for corrupt images and empty captions.

    Args:
        root: the folder.
        transform: an :class:`ImageTransform`, any callable ``PIL.Image -> Tensor``, an int (shorthand for
            ``ImageTransform(size)``: shorter side resized, centre crop), or ``None`` (no resizing).
        recursive: search sub-folders.
        extensions: image file endings.
        caption_ext: the caption file's ending.
        validate: ``"lazy"`` (default) or ``"scan"`` (decode every image now).

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (20, 10)).save(d / "cat.png"); _ = (d / "cat.txt").write_text("a cat")
        >>> ds = CaptionFolder(d, transform=8)
        >>> ds[0]["caption"], tuple(ds[0]["image"].shape)
        ('a cat', (3, 8, 8))
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: int | Transform | None = None,
        *,
        recursive: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        caption_ext: str = ".txt",
        validate: str = "lazy",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root: expected an existing folder, got {str(root)!r}")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        files = root.rglob("*") if recursive else root.glob("*")
        images = sorted(p for p in files if p.suffix.lower() in exts and p.is_file())
        records, missing = [], []
        for p in images:
            cap = p.with_suffix(caption_ext)
            if cap.is_file():
                records.append((str(p), None, str(cap)))
            else:
                missing.append(str(p))
        self.root = root
        super().__init__(records, transform, {"missing_caption": missing}, validate)

    def __repr__(self) -> str:
        return f"CaptionFolder(root={str(self.root)!r}, n={len(self)}, skipped={self.skipped})"


class MetadataImageFolder(_CaptionedFiles):
    """A Hugging Face ``imagefolder``-style dataset: images plus ``metadata.jsonl`` with ``file_name`` and a
    caption column, read with the standard library (the ``datasets`` package is not needed).

    Every ``metadata.jsonl`` under ``root`` (recursively, e.g. one per split folder) is read; its
    ``file_name`` entries are relative to its own folder. Rows that are not JSON objects, lack ``file_name``,
    have no non-empty string in ``caption_column`` or point at a missing file are left out and counted
    (``bad_metadata``, ``missing_caption``, ``missing_image``). Images with no row are ignored, as
    ``datasets`` does.

    Args:
        root: the folder.
        transform: as in :class:`CaptionFolder`.
        caption_column: the JSON key holding the caption (``"text"`` in the Hugging Face docs).
        metadata_file: the metadata file name.
        recursive: also read metadata files in sub-folders.
        validate: ``"lazy"`` or ``"scan"``.

    Example:
        >>> import json, tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(d / "0.png")
        >>> _ = (d / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "black"}) + "\\n")
        >>> MetadataImageFolder(d)[0]["caption"]
        'black'
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: int | Transform | None = None,
        *,
        caption_column: str = "text",
        metadata_file: str = "metadata.jsonl",
        recursive: bool = True,
        validate: str = "lazy",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root: expected an existing folder, got {str(root)!r}")
        metas = sorted(root.rglob(metadata_file) if recursive else [root / metadata_file])
        metas = [m for m in metas if m.is_file()]
        if not metas:
            raise ValueError(f"root: expected a {metadata_file} file in {str(root)!r}, found none")
        records: list[tuple[str, str | None, str | None]] = []
        skips: dict[str, list[str]] = {"bad_metadata": [], "missing_caption": [], "missing_image": []}
        columns: set[str] = set()
        for meta in metas:
            with open(meta, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{meta}:{lineno}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        skips["bad_metadata"].append(where)
                        continue
                    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                        skips["bad_metadata"].append(where)
                        continue
                    columns.update(row)
                    path = meta.parent / row["file_name"]
                    caption = row.get(caption_column)
                    if not isinstance(caption, str) or not caption.strip():
                        skips["missing_caption"].append(str(path))
                    elif not path.is_file():
                        skips["missing_image"].append(str(path))
                    else:
                        records.append((str(path), caption, None))
        if not records and caption_column not in columns:
            # The likeliest mistake: the captions live under another key.
            raise ValueError(
                f"caption_column: expected a key present in {metadata_file}, got {caption_column!r} "
                f"(keys seen: {sorted(columns)})"
            )
        self.root = root
        self.caption_column = caption_column
        super().__init__(records, transform, skips, validate)

    def __repr__(self) -> str:
        return (
            f"MetadataImageFolder(root={str(self.root)!r}, caption_column={self.caption_column!r}, "
            f"n={len(self)}, skipped={self.skipped})"
        )
