"""Real text-image pairs with no download: Noto Color Emoji glyphs captioned with their Unicode names.

The font comes from the Debian package ``fonts-noto-color-emoji`` and the names from the PyPI package
``emoji``. Every fully-qualified emoji is drawn at the font's only size (109 px, a CBDT bitmap font) on a
160 px canvas, composited onto a background colour, and downsampled with LANCZOS. Entries that draw nothing,
or that the font draws as several glyphs side by side (sequences it does not support), are dropped; flags
named after a country get the prefix "flag of". That leaves about 3,800 images ("grinning face",
"flag of Japan", "woman technologist medium skin tone").

Rendering all of them takes a few seconds, so the arrays are cached in a ``.npz`` under
:func:`default_cache_dir` (or ``cache_dir``) keyed by every setting that changes them; later loads read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from trajflow.checkpoint import atomic_write
from trajflow.data.images import to_unit_range

__all__ = ["NOTO_EMOJI_FONT", "default_cache_dir", "emoji_entries", "render_emoji", "EmojiDataset"]

#: Where Debian's ``fonts-noto-color-emoji`` puts the font.
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# CBDT bitmap fonts have fixed strikes; Noto Color Emoji has only 109 px and PIL rejects any other size.
_FONT_SIZE = 109
_CANVAS = 160
# A single glyph is about 136 px wide at size 109; wider means several glyphs (an unsupported sequence).
_MAX_GLYPH_WIDTH = 140
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$TRAJFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/trajflow``, else ``~/.cache/trajflow``."""
    if os.environ.get("TRAJFLOW_CACHE_DIR"):
        return Path(os.environ["TRAJFLOW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trajflow"


def _emoji_module():
    try:
        import emoji
    except ImportError as e:
        raise ImportError(
            "EmojiDataset needs the 'emoji' package for the captions: pip install emoji "
            "(or pip install 'trajflow[t2i]')"
        ) from e
    return emoji


def _load_font(font_path: str | os.PathLike) -> ImageFont.FreeTypeFont:
    if not Path(font_path).is_file():
        raise FileNotFoundError(
            f"font_path: the Noto Color Emoji font was not found at {str(font_path)!r}; install the Debian "
            "package fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji) or pass font_path="
        )
    return ImageFont.truetype(str(font_path), _FONT_SIZE)


def _is_flag(ch: str) -> bool:
    # Country flags are pairs of regional indicators; England/Scotland/Wales are a black flag + tag letters.
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in ch) and len(ch) == 2
    tagged = ch[0] == "\U0001f3f4" and len(ch) > 1 and all(0xE0020 <= ord(c) <= 0xE007F for c in ch[1:])
    return regional or tagged


def emoji_entries(skin_tones: bool = True) -> list[tuple[str, str]]:
    """``(emoji, caption)`` for every fully-qualified emoji in the ``emoji`` package, in its order.

    Example:
        >>> entries = dict(emoji_entries())  # doctest: +SKIP
        >>> entries["\\U0001f600"], entries["\\U0001f1ef\\U0001f1f5"]  # doctest: +SKIP
        ('grinning face', 'flag of Japan')
    """
    emoji = _emoji_module()
    out = []
    for ch, meta in emoji.EMOJI_DATA.items():
        if meta.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        if not skin_tones and any(c in _SKIN_TONES for c in ch):
            continue
        caption = meta["en"].strip(":").replace("_", " ").strip()
        if _is_flag(ch):
            caption = "flag of " + caption
        if caption:
            out.append((ch, caption))
    return out


def render_emoji(
    ch: str, font: ImageFont.FreeTypeFont, resolution: int, background: tuple[int, int, int]
) -> np.ndarray | None:
    """Draw one emoji as a ``(resolution, resolution, 3)`` uint8 array, or ``None`` if the font draws it
    blank or as several glyphs."""
    im = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((_CANVAS // 2, _CANVAS // 2), ch, font=font, embedded_color=True, anchor="mm")
    bbox = im.getbbox()
    if bbox is None or bbox[2] - bbox[0] > _MAX_GLYPH_WIDTH:
        return None
    # Composite at full size, before the resize, so that edge pixels blend with the background and not black.
    bg = Image.new("RGBA", im.size, (*background, 255))
    bg.alpha_composite(im)
    small = bg.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8)


def _colour(background: Any) -> tuple[int, int, int]:
    if isinstance(background, str):
        from PIL import ImageColor

        try:
            return tuple(ImageColor.getrgb(background))[:3]
        except ValueError as e:
            raise ValueError(f"background: expected a colour name or an (r, g, b) tuple, got {background!r}") from e
    if len(background) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        return tuple(int(v) for v in background)
    raise ValueError(f"background: expected a colour name or an (r, g, b) tuple of 0..255, got {background!r}")


class EmojiDataset(Dataset):
    """Noto Color Emoji images captioned with their names, rendered once and cached as ``.npz``.

    Items are ``{"image": (3, R, R) float in [-1, 1] or uint8, "caption": str, "emoji": str}`` (floats are
    pixel bin centres, as :func:`trajflow.data.images.to_unit_range`).

    Args:
        resolution: output side in pixels (8..160; 32 and 64 are the usual).
        background: colour the transparent canvas is composited onto (name or RGB).
        skin_tones: keep the skin-tone variants (about half the set).
        limit: keep only the first ``limit`` usable emoji (quick tests).
        cache_dir: folder for the ``.npz`` cache; ``None`` uses :func:`default_cache_dir`.
        cache: read and write the cache at all.
        font_path: the font file.
        image_format: ``"float"`` or ``"uint8"``.

    Raises ``FileNotFoundError`` (naming the Debian package) without the font and ``ImportError`` (naming the
    pip package) without ``emoji``.

    Example:
        >>> ds = EmojiDataset(resolution=32, limit=4, cache=False)  # doctest: +SKIP
        >>> ds[0]["caption"], tuple(ds[0]["image"].shape)  # doctest: +SKIP
        ('grinning face', (3, 32, 32))
    """

    def __init__(
        self,
        resolution: int = 32,
        *,
        background: str | tuple[int, int, int] = (255, 255, 255),
        skin_tones: bool = True,
        limit: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache: bool = True,
        font_path: str | os.PathLike = NOTO_EMOJI_FONT,
        image_format: str = "float",
    ) -> None:
        if not isinstance(resolution, int) or not 8 <= resolution <= _CANVAS:
            raise ValueError(f"resolution: expected an integer in 8..{_CANVAS}, got {resolution!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
        if image_format not in ("float", "uint8"):
            raise ValueError(f"image_format: expected 'float' or 'uint8', got {image_format!r}")
        self.resolution = resolution
        self.background = _colour(background)
        self.skin_tones = skin_tones
        self.limit = limit
        self.image_format = image_format
        self.font_path = str(font_path)
        emoji = _emoji_module()
        font_stat = Path(font_path).stat() if Path(font_path).is_file() else None
        if font_stat is None:
            _load_font(font_path)  # raises the FileNotFoundError that names the Debian package
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        # Everything that changes the arrays goes into the key, so a new font or emoji release re-renders.
        config = {
            "v": _CACHE_VERSION,
            "resolution": resolution,
            "background": self.background,
            "skin_tones": skin_tones,
            "emoji": getattr(emoji, "__version__", "?"),
            "font": [os.path.abspath(font_path), font_stat.st_size, int(font_stat.st_mtime)],
        }
        self.cache_path: Path | None = None
        images, chars, captions = None, None, None
        if cache:
            full = self._cache_file(config, None)
            self.cache_path = self._cache_file(config, limit)
            # A full-set cache serves any limit; a limited one serves only its own.
            for path in dict.fromkeys([full, self.cache_path]):
                loaded = self._read(path)
                if loaded is not None:
                    images, chars, captions = (a[:limit] for a in loaded)
                    self.cache_path = path
                    break
        if images is None:
            images, chars, captions = self._render(font_path)
            if cache:
                self._write(self.cache_path, images, chars, captions)
        self.images = images  # (N, R, R, 3) uint8
        self.chars = [str(c) for c in chars]
        self.captions = [str(c) for c in captions]

    def _cache_file(self, config: dict[str, Any], limit: int | None) -> Path:
        key = json.dumps({**config, "limit": limit}, sort_keys=True).encode()
        digest = hashlib.sha1(key).hexdigest()[:12]
        tag = "all" if limit is None else f"first{limit}"
        return self.cache_dir / f"emoji-{self.resolution}px-{tag}-{digest}.npz"

    @staticmethod
    def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["chars"], z["captions"]
        except Exception:  # a half-written or foreign file: render again and overwrite it
            return None

    @staticmethod
    def _write(path: Path, images: np.ndarray, chars: np.ndarray, captions: np.ndarray) -> None:
        # Atomic, so that ranks or workers building the cache at the same time never read each other's
        # half-written file.
        atomic_write(path, lambda fh: np.savez(fh, images=images, chars=chars, captions=captions))

    def _render(self, font_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        font = _load_font(font_path)
        images, chars, captions = [], [], []
        for ch, caption in emoji_entries(self.skin_tones):
            arr = render_emoji(ch, font, self.resolution, self.background)
            if arr is None:
                continue
            images.append(arr)
            chars.append(ch)
            captions.append(caption)
            if self.limit is not None and len(images) >= self.limit:
                break
        if not images:
            raise ValueError(f"font_path: expected a font that draws emoji, got {str(font_path)!r} (none rendered)")
        return np.stack(images), np.array(chars), np.array(captions)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).contiguous()
        if self.image_format == "float":
            img = to_unit_range(img)
        return {"image": img, "caption": self.captions[i], "emoji": self.chars[i]}

    def __repr__(self) -> str:
        return f"EmojiDataset(n={len(self)}, resolution={self.resolution}, background={self.background})"
