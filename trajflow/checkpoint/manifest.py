"""Integrity of a training step folder: ``manifest.json`` records each file's size and sha256
(:func:`write_manifest`, at :meth:`~trajflow.checkpoint.CheckpointDir.commit`), checked with every other
record of the step before a run resumes from it (:func:`verify_checkpoint`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import MODEL_FILE, file_sha256, load_json, safetensors_metadata, save_json

__all__ = ["MANIFEST_FILE", "TRAINER_FILE", "DamagedCheckpointError", "write_manifest", "verify_checkpoint"]

MANIFEST_FILE = "manifest.json"
TRAINER_FILE = "trainer.json"
_MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class DamagedCheckpointError(ValueError):
    """A checkpoint folder fails :func:`verify_checkpoint`: a file is missing, truncated, corrupt or edited,
    or its step disagrees with its name. The message names the folder and the file."""


def step_of(name: str) -> int | None:
    """The step of a step folder's name (``step-0000500`` -> 500), or ``None`` for any other name."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def write_manifest(folder: str | os.PathLike, step: int) -> Path:
    """Write ``folder/manifest.json``: ``step`` and the size and sha256 of every other file in ``folder``."""
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    return save_json(folder / MANIFEST_FILE, {"format": _MANIFEST_FORMAT, "step": int(step), "files": files})


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
    files = None if files is None else list(files)
    manifest = _read_manifest(folder)
    for name in _files_to_check(manifest, files):
        _check_file(folder, name, manifest["files"].get(name))
    steps = _recorded_steps(folder, manifest, files)
    if len(set(map(repr, steps.values()))) > 1:
        shown = ", ".join(f"{k}: {v!r}" for k, v in steps.items())
        raise _damaged(folder, f"its step disagrees between its files ({shown})")
    return manifest


def _damaged(folder: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint: {str(folder)!r} is damaged: {what}")


def _read_json(folder: Path, name: str) -> Any:
    try:
        return load_json(folder / name)
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"{name} is unreadable ({e})") from None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, checked to be one, or ``None`` where the folder has none."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    manifest = _read_json(folder, MANIFEST_FILE)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not isinstance(manifest.get("step"), int):
        raise _damaged(folder, f"{MANIFEST_FILE} is not a manifest (expected step and files)")
    return manifest


def _files_to_check(manifest: dict[str, Any] | None, files: list[str] | None) -> Iterable[str]:
    """``files``, by default every file the manifest lists (none without a manifest)."""
    if manifest is None:
        return ()
    return manifest["files"] if files is None else files


def _check_file(folder: Path, name: str, entry: dict[str, Any] | None) -> None:
    """``folder/name`` against its manifest ``entry`` (``None``: the manifest does not list it)."""
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


def _recorded_steps(folder: Path, manifest: dict[str, Any] | None, files: list[str] | None) -> dict[str, Any]:
    """``{where: step}`` for every place the folder records its step, among the files being read.

    The weights' metadata is only compared in folders with a manifest: older ones did not record it.
    """

    def present(name: str) -> bool:
        return (folder / name).is_file() and (files is None or name in files)

    steps: dict[str, Any] = {}
    if step_of(folder.name) is not None:
        steps["the folder name"] = step_of(folder.name)
    if manifest is not None:
        steps[MANIFEST_FILE] = manifest["step"]
    if present(TRAINER_FILE):
        info = _read_json(folder, TRAINER_FILE)
        steps[TRAINER_FILE] = info.get("step") if isinstance(info, dict) else None
    if manifest is not None and present(MODEL_FILE):
        steps.update(_weights_step(folder))
    return steps


def _weights_step(folder: Path) -> dict[str, Any]:
    """``{model.safetensors: step}`` from the weights' metadata, or ``{}`` where it records none."""
    step = _model_metadata(folder).get("step")
    return {} if step is None else {MODEL_FILE: int(step) if step.isdigit() else step}


def _model_metadata(folder: Path) -> dict[str, str]:
    """The header metadata of ``folder/model.safetensors``; an unreadable header is a damaged folder."""
    try:
        return safetensors_metadata(folder / MODEL_FILE)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _damaged(folder, f"{MODEL_FILE} is unreadable ({e})") from None
