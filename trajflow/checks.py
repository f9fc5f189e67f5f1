"""Argument checks shared by trajflow's public entry points.

Every check raises a :class:`ValueError` naming the argument, what was expected and what was given, where
the value enters the library. Finiteness and range checks read values (a GPU synchronisation), so, as in
torch.distributions, they run only where ``validate_args`` (or ``validate``) is on, the default; shape and
type checks always run.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "accepts_keyword",
    "check_count",
    "check_number",
    "check_time_features",
    "check_tensor",
    "check_event_shape",
    "check_finite",
    "check_grid",
    "check_times",
    "check_flat_times",
    "check_step_index",
    "check_edges",
]


def check_tensor(name: str, value: object) -> Tensor:
    """Raise unless ``value`` is a tensor."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_event_shape(name: str, value: Tensor, event_shape: Sequence[int], what: str = "") -> Tensor:
    """Raise unless the trailing dimensions of ``value`` equal ``event_shape``."""
    check_tensor(name, value)
    event_shape = tuple(event_shape)
    n = len(event_shape)
    trailing = tuple(value.shape[value.dim() - n :]) if n else ()
    if value.dim() < n or trailing != event_shape:
        hint = f" ({what})" if what else ""
        raise ValueError(
            f"{name}: expected trailing shape {event_shape}{hint}, got a tensor of shape {tuple(value.shape)}"
        )
    return value


def check_finite(name: str, value: Tensor) -> Tensor:
    """Raise if ``value`` holds NaN or infinite entries."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries in shape {tuple(value.shape)}")
    return value


def check_times(name: str, t: Tensor, *, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Raise unless every entry of ``t`` is finite and in ``[low, high]``."""
    check_tensor(name, t)
    check_finite(name, t)
    if t.numel() and (bool((t < low).any()) or bool((t > high).any())):
        raise ValueError(
            f"{name}: expected times in [{low}, {high}], got values in [{float(t.min()):.6g}, {float(t.max()):.6g}]"
        )
    return t


def check_flat_times(name: str, t: object, n: int, validate: bool = True) -> Tensor:
    """Raise unless ``t`` is a tensor of shape ``(n,)`` (one time per data point of a flat batch) and, with
    ``validate``, its entries are finite and in [0, 1] (which reads them: a GPU synchronisation)."""
    check_tensor(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one time per data point), got {tuple(t.shape)}")
    if validate:
        check_times(name, t)
    return t


def check_grid(grid: Tensor, name: str = "grid", *, validate: bool = True) -> Tensor:
    """Raise unless ``grid`` is a valid time grid ``t_0 < t_1 < ... < t_T = 1`` inside ``[0, 1]``.

    ``grid`` has shape ``(T + 1,)`` or ``(*batch, T + 1)`` with ``T >= 1``. The type and shape are always
    checked; the values (range, order, last time) only with ``validate``, as reading them synchronises a GPU.
    """
    check_tensor(name, grid)
    if not grid.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {grid.dtype}")
    if grid.dim() < 1 or grid.shape[-1] < 2:
        raise ValueError(f"{name}: expected shape (*batch, T + 1) with T >= 1, got {tuple(grid.shape)}")
    if not validate:
        return grid
    check_times(name, grid)
    if not bool((grid[..., 1:] > grid[..., :-1]).all()):
        raise ValueError(f"{name}: expected strictly ascending times along the last dim, got {grid.tolist()}")
    if not bool((grid[..., -1] == 1.0).all()):
        raise ValueError(
            f"{name}: expected the last time to be exactly 1 (the noise level), got {grid[..., -1].tolist()}"
        )
    return grid


def _int_of(value: object) -> object:
    """A one-element integer (not bool) tensor as its ``int``; anything else as it is."""
    integer = isinstance(value, Tensor) and not (value.is_floating_point() or value.dtype == torch.bool)
    return int(value) if integer and value.numel() == 1 else value  # type: ignore[union-attr, arg-type]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_step_index(k: object, steps: int) -> int:
    """Raise unless ``k`` is an integer in ``1..steps``."""
    k = _int_of(k)
    if not _is_int(k) or not 1 <= k <= steps:  # type: ignore[operator]
        raise ValueError(f"k: expected an integer step index in 1..{steps}, got {k!r}")
    return k  # type: ignore[return-value]


def check_edges(name: str, value: object) -> Tensor:
    """Raise unless ``value`` is a 1-D tensor (or numpy array) of at least 2 finite, strictly ascending bin
    edges; returns it as a float64 CPU tensor.

    Example:
        >>> check_edges("edges", torch.tensor([0.0, 0.5, 1.0])).dtype
        torch.float64
        >>> check_edges("edges", torch.tensor([0.0, 0.0]))
        Traceback (most recent call last):
        ...
        ValueError: edges: expected strictly ascending bin edges, got [0.0, 0.0]
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    check_tensor(name, value)
    if value.dim() != 1 or value.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of at least 2 bin edges, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {value.dtype}")
    value = value.detach().to("cpu", torch.float64)
    check_finite(name, value)
    if not bool((value[1:] > value[:-1]).all()):
        shown = value.tolist() if value.numel() <= 8 else f"{value[:8].tolist()}..."
        raise ValueError(f"{name}: expected strictly ascending bin edges, got {shown}")
    return value


def check_count(name: str, value: object, low: int = 1) -> int:
    """Raise unless ``value`` is an integer ``>= low`` (a number of samples, steps, threads ...); returns it.

    A one-element integer tensor counts as its integer; ``bool`` does not count as an integer.

    Example:
        >>> check_count("num_samples", 4)
        4
        >>> check_count("num_samples", 0)
        Traceback (most recent call last):
        ...
        ValueError: num_samples: expected an integer >= 1, got 0 (int)
    """
    value = _int_of(value)
    if not _is_int(value) or value < low:  # type: ignore[operator]
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r} ({type(value).__name__})")
    return value  # type: ignore[return-value]


def check_number(name: str, value: object, *, low: float | None = None, positive: bool = False) -> float:
    """Raise unless ``value`` is a finite real number (a ``numbers.Real`` such as a NumPy float, not a bool),
    ``>= low`` and, with ``positive``, ``> 0``; returns it as a ``float``.

    Example:
        >>> check_number("scale_bound", 8)
        8.0
        >>> check_number("scale_bound", -1.0, positive=True)
        Traceback (most recent call last):
        ...
        ValueError: scale_bound: expected a finite number > 0, got -1.0 (float)
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (real and _in_range(value, low, positive)):
        bound = " > 0" if positive else (f" >= {low}" if low is not None else "")
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r} ({type(value).__name__})")
    return float(value)  # type: ignore[arg-type]


def _in_range(value: object, low: float | None, positive: bool) -> bool:
    return (not positive or value > 0) and (low is None or value >= low)  # type: ignore[operator]


def check_time_features(name: str, value: object) -> int:
    """Raise unless ``value`` is an even integer ``>= 2`` (the size of a sinusoidal time embedding)."""
    if not _is_int(value) or value < 2 or value % 2:  # type: ignore[operator]
        raise ValueError(f"{name}: expected an even integer >= 2, got {value!r} ({type(value).__name__})")
    return value


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` can be called with the keyword argument ``name`` (a parameter of that name, or ``**kwargs``;
    ``False`` where the signature cannot be read): how the Trainer hands ``step``/``progress`` only to the
    objectives that take them.

    Example:
        >>> accepts_keyword(lambda model, batch, generator, step, *, progress: 0, "progress")
        True
        >>> accepts_keyword(lambda model, batch, generator, step: 0, "progress")
        False
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
        for p in params
    )
