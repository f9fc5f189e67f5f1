"""Files that survive crashes (every writer goes through :func:`atomic_write`), in the formats both folder
layouts use: safetensors and JSON, no pickles; :func:`file_sha256` is the checksum both record."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "EMA_FILE",
    "atomic_write",
    "save_json",
    "load_json",
    "save_torch",
    "load_torch",
    "save_safetensors",
    "load_safetensors",
    "file_sha256",
]

# The file names a training step folder and a pretrained folder share.
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the rename itself) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a mix.

    ``write(fh)`` fills a temporary file in the same folder (same file system, so the final rename is
    atomic); it is flushed and fsync-ed, then :func:`os.replace`-d onto ``path``. If ``write`` raises,
    the temporary file is deleted and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = atomic_write(p, lambda fh: fh.write(b"hello"))
        >>> p.read_bytes()
        b'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the checkpoint the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` atomically (tensors, numbers, strings, lists, tuples and dicts only, so that
    :func:`load_torch` can read it with ``weights_only=True``)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint cannot run code when it is read."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save a flat ``{name: tensor}`` dict as safetensors, atomically (tensors are copied to the CPU).

    Tied weights would share storage, which safetensors refuses; every tensor is cloned, so they are
    simply stored twice.
    """
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save(flat, metadata=meta or None)  # an empty header dict with no tensors is unreadable
    return atomic_write(path, lambda fh: fh.write(data))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the string metadata of a safetensors file."""
    tensors = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file (the tensors are not read)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
