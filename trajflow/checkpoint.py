r"""Checkpoints that survive crashes: atomic files, atomic step folders, and config checks on load.

Layout written by :class:`~trajflow.train.Trainer` (one folder per saved step)::

    OUT/checkpoints/step-0000500/
        config.json          the run's full config (what built the model, the data and the optimiser)
        model.safetensors    the model's parameters and persistent buffers
        ema.safetensors      the EMA weights (float32), with the update count in the header
        optimizer.safetensors   optimizer state (tensors, with the rest of the state as JSON in the header)
        scheduler.safetensors   learning-rate scheduler state (the same format, no tensors)
        rng-rank0.safetensors   python / numpy / torch (CPU, CUDA) / generator states, one file per rank
        trainer.json         step, epoch and position in the epoch, world size, torch threads
        manifest.json        the step, and every other file's size and sha256 (written last)
    OUT/checkpoints/latest   the name of the newest complete step folder

Nothing in a checkpoint is a pickle: tensors are safetensors, everything else JSON (:func:`save_state`), so
reading a checkpoint cannot run code. Checkpoints written before this format hold ``optimizer.pt``,
``scheduler.pt`` and ``rng-rank0.pt`` (``torch.save``); they are still read, with ``torch.load(...,
weights_only=True)``, which refuses any pickle that would build an object other than tensors and plain
containers (:func:`load_torch` raises ``pickle.UnpicklingError``; the Trainer turns it into a ``ValueError``
naming the file).

Integrity: :meth:`CheckpointDir.commit` records each file's size and sha256 in ``manifest.json`` before the
folder is renamed into place, and :func:`verify_checkpoint` checks them (and that the step in the folder's
name, the manifest, ``trainer.json`` and the weights' metadata agree) before a run resumes from it. A
truncated, corrupt or edited file is reported by name; :meth:`CheckpointDir.newest_intact` falls back to the
newest checkpoint that passes.

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

import hashlib
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
    "MANIFEST_FILE",
    "TRAINER_FILE",
    "DamagedCheckpointError",
    "atomic_write",
    "save_json",
    "load_json",
    "save_torch",
    "load_torch",
    "save_safetensors",
    "load_safetensors",
    "save_state",
    "load_state",
    "file_sha256",
    "write_manifest",
    "verify_checkpoint",
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
MANIFEST_FILE = "manifest.json"
TRAINER_FILE = "trainer.json"
_MANIFEST_FORMAT = 1
_STATE_KEY = "trajflow.state"
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


# ------------------------------------------------------------------------------------------------ states
def _encode(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (see :func:`save_state`)."""
    if isinstance(obj, Tensor):
        key = str(len(tensors))
        tensors[key] = obj
        return {"$tensor": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {"$dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"state: expected tensors, numbers, strings, None and dicts, lists or tuples of them, got "
        f"{type(obj).__name__} at {where}"
    )


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "$tensor" in obj:
            return tensors[obj["$tensor"]]
        if "$tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$dict"]}
    return obj


def save_state(path: str | os.PathLike, state: Any) -> Path:
    """Save a nested state (an optimizer's or scheduler's ``state_dict()``, random states) without pickle.

    The tensors go into a safetensors file and the structure around them (dicts with any JSON-able keys,
    lists, tuples, numbers, strings, ``None``) into its header as JSON, so :func:`load_state` rebuilds the
    same object, tuples and integer keys included, and reading it cannot run code. Written atomically.

    Raises:
        TypeError: ``state`` holds something else (a function, a custom object), naming where.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.safetensors"
        >>> _ = save_state(p, {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.95)})
        >>> load_state(p)
        {'state': {0: {'step': tensor(3.)}}, 'betas': (0.9, 0.95)}
    """
    tensors: dict[str, Tensor] = {}
    structure = json.dumps(_encode(state, tensors, "state"))
    return save_safetensors(path, tensors, {_STATE_KEY: structure})


def load_state(path: str | os.PathLike) -> Any:
    """Read a state written by :func:`save_state` (tensors on the CPU).

    Raises:
        ValueError: ``path`` is not such a file (naming it).
    """
    try:
        tensors, meta = load_safetensors(path)
        return _decode(json.loads(meta[_STATE_KEY]), tensors)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"state: expected a state file written by save_state, got {str(path)!r} ({e})") from None
    except Exception as e:  # safetensors' own errors on a truncated or corrupt file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"state: {str(path)!r} is not a readable safetensors file ({e})") from None


# ------------------------------------------------------------------------------------------------ manifests
class DamagedCheckpointError(ValueError):
    """A checkpoint folder fails :func:`verify_checkpoint`: a file is missing, truncated, corrupt or edited,
    or its step disagrees with its name. The message names the folder and the file."""


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, step: int) -> Path:
    """Write ``folder/manifest.json``: ``step`` and the size and sha256 of every other file in ``folder``.

    :meth:`CheckpointDir.commit` calls it when every file is in place, just before the folder is renamed.
    """
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    return save_json(folder / MANIFEST_FILE, {"format": _MANIFEST_FORMAT, "step": int(step), "files": files})


def _damaged(folder: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint: {str(folder)!r} is damaged: {what}")


def _read_json(folder: Path, name: str) -> Any:
    try:
        return load_json(folder / name)
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"{name} is unreadable ({e})") from None


def verify_checkpoint(folder: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Check a step folder against its ``manifest.json`` before anything in it is trusted.

    Every file the manifest lists (or only ``files``) must be there with the recorded size and sha256, and the
    step must agree everywhere it is written: the folder's name (``step-0000500``), the manifest,
    ``trainer.json`` and the ``step`` metadata of ``model.safetensors``. A folder written before manifests
    existed has none: only the steps are compared, and ``None`` is returned.

    Returns:
        The manifest (``{"format", "step", "files": {name: {"bytes", "sha256"}}}``), or ``None``.

    Raises:
        DamagedCheckpointError: (a ``ValueError``) naming the folder and the first file that fails.
    """
    folder = Path(folder)
    named = _STEP_DIR.match(folder.name)
    manifest = None
    if (folder / MANIFEST_FILE).is_file():
        manifest = _read_json(folder, MANIFEST_FILE)
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(listed, dict) or not isinstance(manifest.get("step"), int):
            raise _damaged(folder, f"{MANIFEST_FILE} is not a manifest (expected step and files)")
        wanted = listed if files is None else {n: listed.get(n) for n in files}
        for name, entry in wanted.items():
            path = folder / name
            if entry is None:
                raise _damaged(folder, f"{name} is not in its {MANIFEST_FILE}")
            if not path.is_file():
                raise _damaged(folder, f"{name} is missing")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise _damaged(folder, f"{name} has {size} bytes, the manifest recorded {entry.get('bytes')}")
            if file_sha256(path) != entry.get("sha256"):
                raise _damaged(folder, f"{name} does not match its sha256 in the manifest (corrupt or edited)")
    steps = {}
    if named:
        steps["the folder name"] = int(named.group(1))
    if manifest is not None:
        steps[MANIFEST_FILE] = manifest["step"]
    if (folder / TRAINER_FILE).is_file() and (files is None or TRAINER_FILE in files):
        info = _read_json(folder, TRAINER_FILE)
        steps[TRAINER_FILE] = info.get("step") if isinstance(info, dict) else None
    if manifest is not None and (folder / MODEL_FILE).is_file() and (files is None or MODEL_FILE in files):
        meta = _safetensors_metadata(folder / MODEL_FILE)
        if "step" in meta:
            steps[MODEL_FILE] = int(meta["step"]) if meta["step"].isdigit() else meta["step"]
    if len(set(map(repr, steps.values()))) > 1:
        shown = ", ".join(f"{k}: {v!r}" for k, v in steps.items())
        raise _damaged(folder, f"its step disagrees between its files ({shown})")
    return manifest


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (the tensors are not read)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _damaged(path.parent, f"{path.name} is unreadable ({e})") from None


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

    def pointed(self) -> Path | None:
        """The step folder the ``latest`` pointer names, if it names an existing one."""
        try:
            name = (self.root / _LATEST).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        path = self.root / name
        return path if _STEP_DIR.match(name) and path.is_dir() else None

    def newest_intact(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint that passes :func:`verify_checkpoint`, and the newer ones that do not.

        Returns:
            ``(folder or None, [(damaged folder, what is wrong), ...])``, the damaged ones newest first. ``None``
            with an empty list: there is no checkpoint at all.
        """
        damaged = []
        for _, path in reversed(self.steps()):
            try:
                verify_checkpoint(path)
            except DamagedCheckpointError as e:
                damaged.append((path, str(e)))
                continue
            return path, damaged
        return None, damaged

    def commit(self, staging: Path, step: int) -> Path:
        """Record the manifest of a complete staging folder, move it into place as ``step-XXXXXXX``, update
        ``latest``, prune.

        Files in ``staging`` were fsync-ed as they were written (:func:`atomic_write`); the manifest
        (:func:`write_manifest`) is written last, and the folder's entries are flushed before the rename so
        that the renamed folder is complete after a power loss too.
        """
        write_manifest(staging, step)
        _fsync_dir(staging)
        final = self.root / self.name(step)
        if final.exists():  # saving the same step twice (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(self.root)
        atomic_write(self.root / _LATEST, lambda fh: fh.write((final.name + "\n").encode()))
        self.prune(protect=(final,))
        return final

    def prune(self, protect: Iterable[Path] = ()) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, never one in ``protect`` nor the one the
        ``latest`` pointer names (folders of a higher step left by another run must not push out the
        checkpoint just written)."""
        if self.keep is None:
            return
        keep = {Path(p).resolve() for p in protect}
        pointed = self.pointed()
        if pointed is not None:
            keep.add(pointed.resolve())
        others = [path for _, path in self.steps() if path.resolve() not in keep]
        for path in others[: max(len(others) - max(self.keep - len(keep), 0), 0)]:
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

    A folder with a ``manifest.json`` (a Trainer's step folder) has the files read here checked against it
    first (:func:`verify_checkpoint`): a corrupt or edited file raises :class:`DamagedCheckpointError`, a
    ``ValueError`` naming it.
    """
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():
        read = [MODEL_FILE, *([CONFIG_FILE] if expected_config is not None else []), *([EMA_FILE] if ema else [])]
        verify_checkpoint(directory, [n for n in read if (directory / n).is_file()])
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
