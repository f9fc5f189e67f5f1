"""Learned denoisers on disk: pretrained folders (:mod:`trajflow.checkpoint`), loaded into a new denoiser or
an existing one whose class and config must match."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import (
    check_config,
    load_model_weights,
    read_pretrained_config,
)
from .networks import LearnedDenoiser

__all__ = ["save_denoiser", "load_denoiser"]


def save_denoiser(denoiser: LearnedDenoiser, directory: str | os.PathLike) -> Path:
    """``denoiser.save_pretrained(directory)``: ``config.json`` and ``model.safetensors`` (kept for callers)."""
    if not isinstance(denoiser, LearnedDenoiser):
        raise ValueError(f"denoiser: expected a LearnedDenoiser, got {type(denoiser).__name__}")
    return denoiser.save_pretrained(directory)


def load_denoiser(directory: str | os.PathLike, *, into: LearnedDenoiser | None = None) -> LearnedDenoiser:
    """Load a denoiser saved by :meth:`~trajflow.checkpoint.Pretrained.save_pretrained` (or :func:`save_denoiser`).

    Arguments:
        directory: The folder.
        into: An existing denoiser to load the weights into (it keeps its device). Its class and config must
            match the folder's; otherwise a :class:`ValueError` names the classes or every differing field.
            ``None`` builds a new denoiser of the saved class (``LearnedDenoiser.from_pretrained``).
    """
    if into is None:
        return LearnedDenoiser.from_pretrained(directory)
    path = Path(directory)
    record = read_pretrained_config(path)
    if record["class"] != type(into).__name__:
        raise ValueError(f"into: {str(path)!r} holds a pretrained {record['class']}, not a {type(into).__name__}")
    check_config(into.config_dict(), record["config"], source=f"the pretrained folder {str(path)!r}")
    load_model_weights(path, into)  # safetensors: raw tensors only, nothing unpickled
    return into
