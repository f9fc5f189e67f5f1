"""Nested states (an optimizer's or scheduler's ``state_dict()``, random states) saved without pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from .files import load_safetensors, save_safetensors

__all__ = ["save_state", "load_state"]

_STATE_KEY = "trajflow.state"


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
        >>> import tempfile, pathlib, torch
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
    except SafetensorError as e:  # safetensors' own error on a truncated or corrupt file
        raise ValueError(f"state: {str(path)!r} is not a readable safetensors file ({e})") from None
