r"""Checkpoints that survive crashes: atomic files, atomic step folders, and config checks on load.

Layout written by :class:`~trajflow.train.Trainer` (one folder per saved step)::

    OUT/checkpoints/step-0000500/
        config.json          the run's full config (what built the model, the data and the optimiser)
        model.safetensors    the model's parameters and persistent buffers
        ema.safetensors      the EMA weights (float32), with the update count in the header
        optimizer.pt         optimizer state (torch.save; loaded with weights_only=True)
        scheduler.pt         learning-rate scheduler state
        rng-rank0.pt ...     python / numpy / torch (CPU, CUDA) / generator states, one file per rank
        trainer.json         step, epoch and position in the epoch, world size
    OUT/checkpoints/latest   the name of the newest complete step folder

Atomicity, in two layers:

* every file is written to a temporary name in its destination folder, flushed, ``fsync``-ed and moved
  into place with :func:`os.replace` (:func:`atomic_write`), so a reader never sees half a file;
* a step folder is assembled under a hidden staging name (``.step-0000500.tmp``) and renamed to
  ``step-0000500`` only when every file is in it (:meth:`CheckpointDir.commit`). A crash at any point
  leaves the previous step folder, and the ``latest`` pointer to it, untouched; staging folders are
  ignored by readers and removed by the next save.

:func:`check_config` compares a checkpoint's ``config.json`` with the config that is about to use it and
raises a ``ValueError`` naming every field that differs, so that a checkpoint is never silently loaded
into a differently-shaped (or differently-trained) model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

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
    "config_differences",
    "check_config",
    "CheckpointDir",
    "resolve_checkpoint",
    "save_model",
    "load_model_weights",
]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LATEST = "latest"


# ------------------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)
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
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save(flat, metadata=meta or None)  # an empty header dict with no tensors is unreadable
    return atomic_write(path, lambda fh: fh.write(data))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the string metadata of a safetensors file."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


# ------------------------------------------------------------------------------------------------ config
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
        return out
    # Lists and tuples compare as JSON lists (a config read back from JSON has lists where it had tuples).
    if isinstance(obj, tuple):
        obj = list(obj)
    return {prefix[:-1]: obj}


def config_differences(
    expected: Mapping[str, Any], found: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``[(dotted field, value in found, value in expected)]`` for every field that differs.

    Nested dicts are compared field by field; a field missing on one side shows as ``<missing>``.
    ``ignore`` lists dotted fields, or prefixes ending in ``.``, to leave out (log cadence, output paths).

    Example:
        >>> config_differences({"model": {"width": 64, "depth": 2}}, {"model": {"width": 32, "depth": 2}})
        [('model.width', 32, 64)]
    """
    a, b = _flatten(json.loads(json.dumps(expected))), _flatten(json.loads(json.dumps(found)))
    skip = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == s or (s.endswith(".") and key.startswith(s)) for s in skip)

    diffs = []
    for key in sorted(set(a) | set(b)):
        if ignored(key):
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:
            diffs.append((key, vb, va))
    return diffs


def check_config(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    source: str = "the checkpoint",
) -> None:
    """Raise a ``ValueError`` naming every differing field unless ``found`` matches ``expected``.

    Example:
        >>> try:
        ...     check_config({"model": {"width": 64}}, {"model": {"width": 32}})
        ... except ValueError as e:
        ...     print(str(e).split("; ")[1])
        differing fields: model.width (checkpoint: 32, now: 64)
    """
    diffs = config_differences(expected, found, ignore=ignore)
    if diffs:
        shown = ", ".join(f"{k} (checkpoint: {vf!r}, now: {ve!r})" for k, vf, ve in diffs[:12])
        more = f" and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise ValueError(f"config: {source} was written with a different config; differing fields: {shown}{more}")


# ------------------------------------------------------------------------------------------------ folders
class CheckpointDir:
    """A folder of step checkpoints ``step-0000500/``, committed atomically, keeping the newest ``keep``.

    Arguments:
        root: The folder (created on the first save).
        keep: How many complete checkpoints to keep (``None``: all).

    Example:
        >>> import tempfile
        >>> ckpts = CheckpointDir(tempfile.mkdtemp(), keep=2)
        >>> for step in (10, 20, 30):
        ...     staging = ckpts.staging(step)
        ...     _ = save_json(staging / "trainer.json", {"step": step})
        ...     _ = ckpts.commit(staging, step)
        >>> [s for s, _ in ckpts.steps()], ckpts.latest().name
        ([20, 30], 'step-0000030')
    """

    def __init__(self, root: str | os.PathLike, keep: int | None = 3) -> None:
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep: expected a positive integer or None, got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:07d}"

    def steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, folder)``, oldest first (staging folders are not listed)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``.

        The ``latest`` pointer is only a convenience for people and scripts: the newest complete step folder
        is what counts, so a pointer left behind by a crash between the rename and its update is harmless.
        """
        steps = self.steps()
        return steps[-1][1] if steps else None

    def staging(self, step: int) -> Path:
        """An empty hidden folder to assemble checkpoint ``step`` in (left-overs of a crash are removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        path = self.root / f".{self.name(step)}.tmp"
        path.mkdir()
        return path

    def commit(self, staging: Path, step: int) -> Path:
        """Move a complete staging folder into place as ``step-XXXXXXX``, update ``latest``, prune.

        Files in ``staging`` were fsync-ed as they were written (:func:`atomic_write`); the folder's entries
        are flushed before the rename so that the renamed folder is complete after a power loss too.
        """
        _fsync_dir(staging)
        final = self.root / self.name(step)
        if final.exists():  # saving the same step twice (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(self.root)
        atomic_write(self.root / _LATEST, lambda fh: fh.write((final.name + "\n").encode()))
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        if self.keep is None:
            return
        for _, path in self.steps()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder that ``path`` designates: a step folder itself, a ``checkpoints`` folder (its newest
    step), or a run folder holding ``checkpoints/`` (its newest step), or a folder with a model export
    (``config.json`` + ``model.safetensors``).

    Raises ``FileNotFoundError`` saying what was looked for.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: {str(p)!r} does not exist")
    if (p / CONFIG_FILE).is_file() and ((p / MODEL_FILE).is_file() or (p / EMA_FILE).is_file()):
        return p
    for root in (p, p / "checkpoints"):
        latest = CheckpointDir(root, keep=None).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"checkpoint: expected a step folder (config.json + model.safetensors), a checkpoints folder or a run "
        f"folder with checkpoints/, got {str(p)!r} with none of these"
    )


# ------------------------------------------------------------------------------------------------ models
def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    ema_state: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and ``ema.safetensors``) into ``directory`` atomically
    (each file); for a whole-folder guarantee use :class:`CheckpointDir`."""
    directory = Path(directory)
    save_safetensors(directory / MODEL_FILE, model.state_dict(), metadata)
    if ema_state is not None:
        save_safetensors(directory / EMA_FILE, ema_state, metadata)
    save_json(directory / CONFIG_FILE, dict(config))
    return directory


def load_model_weights(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    expected_config: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    ema: bool = False,
) -> dict[str, str]:
    """Load ``model.safetensors`` (or the EMA weights, ``ema=True``) of a checkpoint into ``model``.

    With ``expected_config``, the checkpoint's ``config.json`` is compared first and a ``ValueError`` names
    every differing field (see :func:`check_config`). EMA files hold only the averaged parameters;
    buffers come from ``model.safetensors``. Returns the file's metadata.
    """
    directory = Path(directory)
    if expected_config is not None:
        found = load_json(directory / CONFIG_FILE)
        check_config(expected_config, found, ignore=ignore, source=f"the checkpoint {str(directory)!r}")
    state, meta = load_safetensors(directory / MODEL_FILE)
    if ema:
        if not (directory / EMA_FILE).is_file():
            raise FileNotFoundError(f"ema: the checkpoint {str(directory)!r} holds no {EMA_FILE}")
        averaged, meta = load_safetensors(directory / EMA_FILE)
        state.update(averaged)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint: the weights in {str(directory)!r} do not fit the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return meta
