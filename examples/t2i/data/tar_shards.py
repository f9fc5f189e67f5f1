"""Webdataset-style tar shards streamed from disk as an ``IterableDataset``, for data larger than memory.

A shard is a plain (or compressed) tar whose members are grouped into samples by key: ``0001.jpg`` and
``0001.txt`` are one sample (the key is the path up to the first dot of the file name, as webdataset does),
and the files of a sample must be next to each other in the tar. Each shard is read once, front to back,
with ``tarfile``'s streaming mode, so memory use does not grow with the shard.

Shards are split first across distributed ranks and then across DataLoader workers, so that every sample is
read by exactly one worker of one rank per epoch. With fewer shards than ``world_size * num_workers``, every
consumer reads every shard and keeps every ``n``-th sample instead (``split="auto"`` switches by itself).

A sample whose image does not decode, that has no caption or no image, or a shard that is missing or
truncated, is skipped with a warning and counted in ``stats`` (counts of skip *events*, summed over this
process's workers and cumulative over epochs; ``reset_stats()`` clears them). The stream never stops for
one bad sample.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from examples.t2i.data.images import ImageTransform, load_rgb
from examples.t2i.data.skips import SkipCounter, warn_skip

__all__ = ["expand_braces", "TarShards"]

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_STAT_KEYS = ("samples", "corrupt_image", "missing_caption", "missing_image", "bad_shard")


def _match_brace(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_commas(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: numeric ranges (zero padding kept) and comma lists, nested, left to right.

    Example:
        >>> expand_braces("shards-{000..002}.tar")
        ['shards-000.tar', 'shards-001.tar', 'shards-002.tar']
        >>> expand_braces("{train,val}-{0..1}.tar")
        ['train-0.tar', 'train-1.tar', 'val-0.tar', 'val-1.tar']
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _match_brace(pattern, start)
    if end < 0:
        raise ValueError(f"pattern: expected balanced braces, got {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        # "{000..009}" keeps its width; "{0..10}" does not pad.
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        alts = _split_top_commas(body)
        if len(alts) == 1:  # "{abc}" is not an expansion in the shell either: keep it literally
            return [head + "{" + x + "}" + t for x in expand_braces(body) for t in expand_braces(tail)]
        options = [x for alt in alts for x in expand_braces(alt)]
    return [head + o + t for o in options for t in expand_braces(tail)]


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + "/" if folder else "") + stem, ext.lower() if dot else ""


class TarShards(IterableDataset):
    """Stream ``(image, caption)`` samples from webdataset-style tar shards.

    Items are ``{"image": (3, H, W) float in [-1, 1], "caption": str, "key": str, "shard": str}``.

    Args:
        shards: a path or brace pattern (``"data/shard-{000..009}.tar"``), or a list of them.
        transform: an :class:`ImageTransform`, a callable ``PIL.Image -> Tensor``, an int size, or ``None``.
        caption_ext: the caption member's extension.
        image_exts: image extensions, in order of preference when a sample has several.
        rank, world_size: this process's place among distributed ranks; ``None`` reads them from
            ``torch.distributed`` when it is initialised, else ``0`` and ``1``.
        split: ``"shard"`` (each consumer reads whole shards), ``"sample"`` (each reads all shards and keeps
            every n-th sample; for fewer shards than consumers), or ``"auto"``.
        shuffle: shuffle the shard order each epoch (the same order on every rank, seeded by ``seed`` and
            :meth:`set_epoch`) and shuffle samples in a buffer of ``shuffle_buffer`` samples per worker.
        seed: seed for the shuffles.

    Shards must exist when the dataset is built (a ``FileNotFoundError`` names those that do not); a shard
    that disappears or breaks later is skipped and counted as ``bad_shard``.

    Example:
        >>> import io, tarfile, tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with tarfile.open(d / "shard-0.tar", "w") as tar:
        ...     for name, data in [("a.txt", b"a dot"), ("a.png", b"")]:
        ...         if name.endswith(".png"):
        ...             buf = io.BytesIO(); Image.new("RGB", (4, 4)).save(buf, "PNG"); data = buf.getvalue()
        ...         info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))
        >>> [s["caption"] for s in TarShards(str(d / "shard-{0..0}.tar"), transform=4)]
        ['a dot']
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        transform: int | Callable[[Image.Image], Tensor] | None = None,
        *,
        caption_ext: str = "txt",
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp", "bmp"),
        rank: int | None = None,
        world_size: int | None = None,
        split: str = "auto",
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        urls = [u for p in patterns for u in expand_braces(os.fspath(p))]
        if not urls:
            raise ValueError(f"shards: expected at least one shard path, got {shards!r}")
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"shards: {len(missing)} of {len(urls)} shard files do not exist: {shown}")
        if rank is None or world_size is None:
            import torch.distributed as dist

            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in 0..{world_size - 1}, got {rank!r}")
        if split not in ("auto", "shard", "sample"):
            raise ValueError(f"split: expected 'auto', 'shard' or 'sample', got {split!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected a non-negative integer, got {shuffle_buffer!r}")
        if transform is None or isinstance(transform, int):
            transform = ImageTransform(transform)
        self.urls = urls
        self.transform = transform
        self.caption_ext = caption_ext.lstrip(".").lower()
        self.image_exts = tuple(e.lstrip(".").lower() for e in image_exts)
        self.rank = rank
        self.world_size = world_size
        self.split = split
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(seed)
        self.epoch = 0
        self._counter = SkipCounter(_STAT_KEYS)

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle for a new epoch. Call it before creating the epoch's iterator; workers started
        with ``persistent_workers=True`` keep the epoch they were started with."""
        self.epoch = int(epoch)

    @property
    def stats(self) -> dict[str, int]:
        """``samples`` yielded and skip events by reason, summed over this process's DataLoader workers."""
        return self._counter.as_dict()

    @property
    def skipped(self) -> int:
        """How many samples (and shards) were skipped so far."""
        return self._counter.total(exclude=("samples",))

    def reset_stats(self) -> None:
        self._counter.reset()

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * nw + wid, self.world_size * nw

    def _samples(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Group the members of one shard into ``(key, {ext: bytes})``; a broken shard ends early, counted."""
        key, parts = None, {}
        try:
            with tarfile.open(url, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k != key:
                        if key is not None:
                            yield key, parts
                        key, parts = k, {}
                    fh = tar.extractfile(member)
                    parts[ext] = fh.read() if fh is not None else b""
        except (OSError, tarfile.TarError, EOFError) as e:
            self._counter.add("bad_shard")
            warn_skip(f"the rest of shard {url}", f"{type(e).__name__}: {e}")
            # The last sample may be cut short; drop it rather than yield half of it.
            return
        if key is not None:
            yield key, parts

    def _decode(self, url: str, key: str, parts: dict[str, bytes]) -> dict[str, Any] | None:
        ext = next((e for e in self.image_exts if e in parts), None)
        if ext is None:
            self._counter.add("missing_image")
            warn_skip(f"{url}:{key}", f"no image member (found {sorted(parts)})")
            return None
        raw = parts.get(self.caption_ext)
        try:
            caption = raw.decode("utf-8").strip() if raw is not None else ""
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            self._counter.add("missing_caption")
            warn_skip(f"{url}:{key}", f"missing or empty .{self.caption_ext} caption")
            return None
        try:
            img = load_rgb(parts[ext])
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files: skip them all
            self._counter.add("corrupt_image")
            warn_skip(f"{url}:{key}.{ext}", f"cannot decode image ({type(e).__name__}: {e})")
            return None
        return {"image": self.transform(img), "caption": caption, "key": key, "shard": url}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.shuffle:
            # Same permutation on every rank and worker (seeded by seed and epoch only), so the split below
            # still hands each shard to exactly one consumer.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(urls))
            urls = [urls[i] for i in order]
        consumer, n_consumers = self._consumer()
        by_sample = self.split == "sample" or (self.split == "auto" and len(urls) < n_consumers)
        mine = urls if by_sample else urls[consumer::n_consumers]
        rng = np.random.default_rng([self.seed, self.epoch, consumer, 1])
        buffer: list[dict[str, Any]] = []
        index = 0
        for url in mine:
            for key, parts in self._samples(url):
                if by_sample:
                    index += 1
                    if (index - 1) % n_consumers != consumer:
                        continue  # another consumer's sample: skip it before paying for the decode
                item = self._decode(url, key, parts)
                if item is None:
                    continue
                if not (self.shuffle and self.shuffle_buffer > 1):
                    self._counter.add("samples")
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    self._counter.add("samples")
                    yield buffer.pop()
        rng.shuffle(buffer)
        for item in buffer:
            self._counter.add("samples")
            yield item

    def __repr__(self) -> str:
        return (
            f"TarShards({len(self.urls)} shards, rank={self.rank}/{self.world_size}, split={self.split!r}, "
            f"shuffle={self.shuffle})"
        )
