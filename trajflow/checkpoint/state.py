"""Nested states (an optimizer's or scheduler's ``state_dict()``, random states) saved without pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from .files import load_safetensors, save_safetensors

__all__ = ["save_state", "load_state"]

_STATE_KEY = "trajflow.state"


def _encode_tensor(obj: Tensor, tensors: dict[str, Tensor], where: str) -> Any:
    key = str(len(tensors))
    tensors[key] = obj
    return {"$tensor": key}


# How each kind of value is written as JSON, its tensors moved into ``tensors`` (see :func:`save_state`).
_ENCODERS: tuple[tuple[type | tuple[type, ...], Callable[[Any, dict[str, Tensor], str], Any]], ...] = (
    (Tensor, _encode_tensor),
    ((bool, int, float, str, type(None)), lambda obj, tensors, where: obj),
    (
        Mapping,
        lambda obj, tensors, where: {
            "$dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]
        },
    ),
    (tuple, lambda obj, tensors, where: {"$tuple": _encode(list(obj), tensors, where)}),
    (list, lambda obj, tensors, where: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]),
)

# How each tagged JSON object is read back: {"$tensor": key}, {"$tuple": [...]}, {"$dict": [[key, value], ...]}.
_DECODERS: dict[str, Callable[[Any, Mapping[str, Tensor]], Any]] = {
    "$tensor": lambda key, tensors: tensors[key],
    "$tuple": lambda items, tensors: tuple(_decode(items, tensors)),
    "$dict": lambda pairs, tensors: {_decode(k, tensors): _decode(v, tensors) for k, v in pairs},
}


def _encode(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    encode = next((fn for kind, fn in _ENCODERS if isinstance(obj, kind)), None)
    if encode is None:
        raise TypeError(
            f"state: expected tensors, numbers, strings, None and dicts, lists or tuples of them, got "
            f"{type(obj).__name__} at {where}"
        )
    return encode(obj, tensors, where)


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    ((tag, value),) = obj.items()  # one tag per object; anything else is not a state file (a ValueError)
    return _DECODERS[tag](value, tensors)


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
