r"""Training checkpoints: one step folder per save, committed atomically, and the model weights in them.

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

Every file is written atomically (:func:`~trajflow.checkpoint.atomic_write`), and a step folder is assembled
under a hidden staging name (``.step-0000500.tmp``) and renamed into place only when complete
(:meth:`CheckpointDir.commit`): a crash leaves the previous step folder and ``latest`` untouched. Its
``manifest.json`` is checked before a run resumes from it (:meth:`CheckpointDir.newest_intact`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .configs import check_config
from .files import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    atomic_write,
    fsync_dir,
    load_json,
    load_safetensors,
    save_json,
    save_safetensors,
)
from .manifest import MANIFEST_FILE, DamagedCheckpointError, step_of, verify_checkpoint, write_manifest

__all__ = ["CheckpointDir", "resolve_checkpoint", "save_model", "load_model_weights"]

_LATEST = "latest"


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
        found = [(step_of(p.name), p) for p in (self.root.iterdir() if self.root.is_dir() else ())]
        return sorted((step, p) for step, p in found if step is not None and p.is_dir())

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` (what counts, not the ``latest`` pointer: a pointer left
        behind by a crash between the rename and its update is harmless)."""
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
        return path if step_of(name) is not None and path.is_dir() else None

    def newest_intact(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """``(the newest checkpoint that passes verify_checkpoint or None, [(newer damaged folder, what is wrong),
        ...] newest first)``; ``(None, [])``: there is no checkpoint at all."""
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
        """Write the manifest of a complete staging folder (its files were fsync-ed as written), flush its
        entries, rename it to ``step-XXXXXXX`` (complete after a power loss too), update ``latest`` and prune."""
        write_manifest(staging, step)
        fsync_dir(staging)
        final = self.root / self.name(step)
        if final.exists():  # saving the same step twice (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(self.root)
        atomic_write(self.root / _LATEST, lambda fh: fh.write((final.name + "\n").encode()))
        self.prune(protect=(final,))
        return final

    def prune(self, protect: Iterable[Path] = ()) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, never one in ``protect`` nor the one the
        ``latest`` pointer names (folders of a higher step left by another run must not push out the
        checkpoint just written)."""
        if self.keep is None:
            return
        keep = {Path(p).resolve() for p in (*protect, *filter(None, [self.pointed()]))}
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
    if _is_model_folder(p):
        return p
    latest = CheckpointDir(p, keep=None).latest() or CheckpointDir(p / "checkpoints", keep=None).latest()
    if latest is None:
        raise FileNotFoundError(
            f"checkpoint: expected a step folder (config.json + model.safetensors), a checkpoints folder or a run "
            f"folder with checkpoints/, got {str(p)!r} with none of these"
        )
    return latest


def _is_model_folder(p: Path) -> bool:
    """Whether ``p`` holds a model export: ``config.json`` and ``model.safetensors`` or ``ema.safetensors``."""
    return (p / CONFIG_FILE).is_file() and ((p / MODEL_FILE).is_file() or (p / EMA_FILE).is_file())


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    ema_state: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and ``ema.safetensors``) into ``directory``, each file
    atomically; :class:`CheckpointDir` makes the whole folder atomic."""
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
    """Load ``model.safetensors`` (with the EMA's averaged parameters, ``ema=True``) of a checkpoint into ``model``;
    returns the file's metadata.

    With ``expected_config``, the checkpoint's ``config.json`` is compared first (:func:`check_config`, a
    ``ValueError`` naming every differing field). A folder with a ``manifest.json`` has the files read here
    checked against it first: a corrupt or edited file raises :class:`DamagedCheckpointError`.
    """
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():  # check the files read here against it
        read = [MODEL_FILE] + [CONFIG_FILE] * (expected_config is not None) + [EMA_FILE] * ema
        verify_checkpoint(directory, filter(lambda name: (directory / name).is_file(), read))
    if expected_config is not None:
        found = load_json(directory / CONFIG_FILE)
        check_config(expected_config, found, ignore=ignore, source=f"the checkpoint {str(directory)!r}")
    state, meta = _weights(directory, ema)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint: the weights in {str(directory)!r} do not fit the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return meta


def _weights(directory: Path, ema: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's weights in a checkpoint (with the EMA's averages over its parameters when ``ema``) and the
    metadata of the file read last."""
    state, meta = load_safetensors(directory / MODEL_FILE)
    if ema:
        if not (directory / EMA_FILE).is_file():
            raise FileNotFoundError(f"ema: the checkpoint {str(directory)!r} holds no {EMA_FILE}")
        averaged, meta = load_safetensors(directory / EMA_FILE)
        state.update(averaged)
    return state, meta
