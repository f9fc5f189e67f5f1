"""A :class:`~trajflow.train.Trainer`'s output folder across sessions: the checkpoint a run resumes from (the
newest intact one, :func:`checkpoint_to_resume`), the run a fresh start may not overwrite
(:func:`check_fresh_start`), ``log.jsonl`` cut back to the resumed step (:func:`cut_log`), and the states read
back without pickle (:func:`restore_states`)."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    TRAINER_FILE,
    CheckpointDir,
    DamagedCheckpointError,
    atomic_write,
    check_config,
    check_renamed_fields,
    load_json,
    load_safetensors,
    load_state,
    resolve_checkpoint,
    verify_checkpoint,
)
from ..ema import EMA
from .config import RESUME_IGNORED_FIELDS, TrainerConfig
from .random_state import restore_rng_state

__all__ = [
    "LOG_FILE",
    "check_fresh_start",
    "checkpoint_to_resume",
    "check_resume",
    "cut_log",
    "read_state",
    "restore_states",
    "check_threads",
]

LOG_FILE = "log.jsonl"


def check_fresh_start(out_dir: Path, checkpoints: CheckpointDir, resume: bool | str | os.PathLike | None) -> None:
    """Refuse to start a fresh run (``resume`` false) in ``out_dir`` when it already holds one (a step checkpoint
    or a non-empty ``log.jsonl``, which a fresh run would mix with its own).

    Raises:
        FileExistsError: naming ``out_dir``, what it holds and ``resume``.
    """
    if resume:
        return
    steps = checkpoints.steps()
    log = out_dir / LOG_FILE
    held = [f"checkpoints up to {steps[-1][1].name}"] if steps else []
    if log.is_file() and log.stat().st_size > 0:
        held.append(LOG_FILE)
    if held:
        raise FileExistsError(
            f"out_dir: {str(out_dir)!r} already holds a run ({', '.join(held)}); pass resume=True to continue "
            "it, or choose another out_dir (a fresh run never overwrites one)"
        )


def checkpoint_to_resume(
    checkpoints: CheckpointDir, resume: bool | str | os.PathLike, say: Callable[[str], None]
) -> Path | None:
    """The checkpoint a run continues from: ``resume=True``: the newest intact one in ``checkpoints``; a path:
    that step folder, or the newest intact one of a run or checkpoints folder; false: ``None``.

    Each is verified first (:func:`~trajflow.checkpoint.verify_checkpoint`); a damaged one is skipped for the
    next older one with a warning naming it, but a step folder named explicitly is not replaced.

    Raises:
        DamagedCheckpointError: a ``ValueError``: the named step folder is damaged, or every checkpoint is.
        FileNotFoundError: ``resume`` is a path with no checkpoint in it.
    """
    if not resume:
        return None
    folder = checkpoints
    if resume is not True:
        named, folder = _named_checkpoint(Path(resume))
        if named is not None:
            return named
    return _newest_intact(folder, say)


def _named_checkpoint(path: Path) -> tuple[Path | None, CheckpointDir]:
    """``(the step folder or model export that path names, verified, or None; the folder to search otherwise)``."""
    if path.is_dir() and re.match(r"^step-\d+$", path.name):
        verify_checkpoint(path)  # the folder asked for, or none
        return path, CheckpointDir(path.parent, keep=None)
    found = resolve_checkpoint(path)
    if found == path:  # a folder with a model export
        verify_checkpoint(path)
        return path, CheckpointDir(path.parent, keep=None)
    return None, CheckpointDir(found.parent, keep=None)


def _newest_intact(folder: CheckpointDir, say: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint of ``folder``, warning about each newer damaged one (``None``: none at all)."""
    ckpt, damaged = folder.newest_intact()
    _warn_damaged(damaged, say)
    if ckpt is None and damaged:
        raise DamagedCheckpointError(
            f"resume: no intact checkpoint in {str(folder.root)!r}: "
            + "; ".join(what for _, what in damaged)
            + " (delete the damaged folders to start afresh, or restore them from a copy)"
        )
    if ckpt is None:
        say(f"resume: no checkpoint in {folder.root}, starting from step 0")
    elif damaged:
        say(f"resume: falling back to {ckpt.name}, the newest intact checkpoint")
    return ckpt


def _warn_damaged(damaged: list[tuple[Path, str]], say: Callable[[str], None]) -> None:
    for _, what in damaged:
        message = f"resume: skipping a damaged checkpoint: {what}"
        warnings.warn(message, RuntimeWarning, stacklevel=6)  # past this module and Trainer.fit, to fit's caller
        say(message)


def check_resume(
    ckpt: Path, run_config: Mapping[str, Any], world_size: int, device: torch.device, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Check that ``ckpt`` may continue this run and return its ``trainer.json``.

    Raises:
        ValueError: the checkpoint's config has a ``train`` key renamed in 0.3.0, or differs outside
            :data:`RESUME_IGNORED_FIELDS` and ``ignore`` (naming every field), or was written by another number
            of processes (the data order depends on it).

    Warns (``RuntimeWarning``) when its torch thread count differs on the CPU (:func:`check_threads`).
    """
    source = f"the checkpoint {str(ckpt)!r}"
    ignored = (*RESUME_IGNORED_FIELDS, *ignore)
    saved = load_json(ckpt / CONFIG_FILE)
    check_renamed_fields(TrainerConfig, saved.get("train", {}), "train", source)
    check_config(run_config, saved, ignore=ignored, source=source)
    info = load_json(ckpt / TRAINER_FILE)
    if info["world_size"] != world_size:
        raise ValueError(
            f"world_size: the checkpoint {str(ckpt)!r} was written by {info['world_size']} processes, this run "
            f"has {world_size}; the data order (and so exact resumption) depends on it"
        )
    check_threads(info, ckpt, device)
    return info


def cut_log(path: Path, step: int) -> int:
    """Keep only the records of ``log.jsonl`` up to ``step`` (the step a run resumes from); returns how many
    were dropped. Unreadable lines (one cut short by a kill) are dropped too. Rewritten atomically."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line + "\n" for line in lines if _up_to(line, step)]
    if len(kept) < len(lines):
        atomic_write(path, lambda fh: fh.write("".join(kept).encode("utf-8")))
    return len(lines) - len(kept)


def _up_to(line: str, step: int) -> bool:
    """Whether ``line`` is a record of a step up to ``step``."""
    try:
        record = json.loads(line)
        return isinstance(record, dict) and float(record.get("step", math.inf)) <= step
    except (ValueError, TypeError):
        return False


def read_state(ckpt: Path, stem: str) -> Any:
    """The state ``stem`` (``optimizer``, ``scheduler``, ``rng-rank0``) of a checkpoint, ``stem.safetensors``.

    Raises:
        ValueError: naming the file, when it is missing (checkpoints before trajflow 0.3.0 hold pickled
            ``stem.pt`` states, which are not read) or is not a state file.
    """
    path = ckpt / f"{stem}.safetensors"
    if not path.is_file():
        pickled = " (a checkpoint written before trajflow 0.3.0 holds pickled .pt states, which are not read)"
        raise ValueError(f"checkpoint: {str(path)!r} is missing{pickled if (ckpt / f'{stem}.pt').exists() else ''}")
    return load_state(path)


def check_threads(info: dict[str, Any], ckpt: Path, device: torch.device) -> None:
    """Warn when a CPU run resumes with another torch thread count than its checkpoint was written with: the
    CPU kernels' reductions depend on it, so the resumed run is not bit-exact with an uninterrupted one."""
    threads, now = info.get("threads"), torch.get_num_threads()
    if device.type == "cpu" and threads is not None and threads != now:
        warnings.warn(
            f"threads: the checkpoint {str(ckpt)!r} was written with {threads} torch threads and this run has {now}; "
            f"CPU results depend on the thread count, so the resumed run will not be bit-exact with an "
            f"uninterrupted one (torch.set_num_threads({threads}) to match)",
            RuntimeWarning,
            stacklevel=4,  # the line of Trainer.fit that resumes
        )


def restore_states(
    ckpt: Path,
    wrapped: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    ema: EMA | None,
    generator: torch.Generator,
    *,
    rank: int,
    fsdp: bool,
) -> None:
    """Load the optimizer, scheduler, EMA and random states of ``ckpt`` (the weights are already in).

    ``wrapped`` and ``optimizer`` are as accelerate prepared them (``fsdp``: the full optimizer state goes into
    the sharded one). The random states of process ``rank`` come last, so that nothing consumes one before the
    first step.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            wrapped,
            optimizer.optimizer,
            read_state(ckpt, "optimizer"),
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
    else:
        # Loaded on the CPU; load_state_dict moves each state tensor to its parameter's device.
        optimizer.load_state_dict(read_state(ckpt, "optimizer"))
    scheduler.load_state_dict(read_state(ckpt, "scheduler"))
    if ema is not None:
        averaged, meta = load_safetensors(ckpt / EMA_FILE)
        ema.load_state_dict(averaged, meta)
    restore_rng_state(read_state(ckpt, f"rng-rank{rank}"), generator)
