"""Conditions: a tensor (class index, vector) or a tuple of tensors (text features and their mask).

A predictor says how many trailing dims form one condition (``cond_event_dims``: an int for a tensor, a
tuple of ints for a tuple), and the leading dims are the condition's batch shape. These helpers move
conditions around without knowing what they mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Condition = Tensor | tuple[Tensor, ...]
EventDims = int | tuple[int, ...]

__all__ = [
    "Condition",
    "EventDims",
    "cond_batch_shape",
    "map_cond",
    "align_cond",
    "cat_cond",
    "check_text_condition",
    "condition_event_dims",
]


def _pairs(cond: Condition, event_dims: EventDims) -> list[tuple[Tensor, int]]:
    if isinstance(cond, Tensor):
        if not isinstance(event_dims, int):
            raise ValueError(f"cond: expected a tuple of {len(event_dims)} tensors, got a single tensor")
        return [(cond, event_dims)]
    if not isinstance(cond, tuple) or not all(isinstance(c, Tensor) for c in cond):
        raise ValueError(f"cond: expected a tensor or a tuple of tensors, got {type(cond).__name__}")
    if isinstance(event_dims, int) or len(event_dims) != len(cond):
        raise ValueError(f"cond: expected {event_dims} event dims per part, got a tuple of {len(cond)} tensors")
    return list(zip(cond, event_dims))


def cond_batch_shape(cond: Condition, event_dims: EventDims) -> torch.Size:
    """The batch shape of ``cond``: the dims left of its event dims (taken from the first tensor)."""
    pairs = _pairs(cond, event_dims)
    shapes = []
    for c, ed in pairs:
        if c.dim() < ed:
            raise ValueError(f"cond: expected at least {ed} dims, got shape {tuple(c.shape)}")
        shapes.append(c.shape[: c.dim() - ed])
    for s in shapes[1:]:
        if s != shapes[0]:
            raise ValueError(f"cond: the parts disagree on the batch shape: {[tuple(s) for s in shapes]}")
    return torch.Size(shapes[0])


def map_cond(fn: Callable[[Tensor, int], Tensor], cond: Condition, event_dims: EventDims) -> Condition:
    """Apply ``fn(tensor, event_dims)`` to every part of ``cond``."""
    out = [fn(c, ed) for c, ed in _pairs(cond, event_dims)]
    return out[0] if isinstance(cond, Tensor) else tuple(out)


def align_cond(cond: Condition, event_dims: EventDims, lead: torch.Size, inner: int = 0) -> Condition:
    """Broadcast ``cond`` of batch shape ``batch`` to ``(*lead, *event)`` and flatten ``lead``.

    ``lead`` is ``(*sample, *batch, *inner_dims)`` where the last ``inner`` dims (e.g. the level axis of
    a trajectory) come after the batch dims; singleton dims are inserted for them.
    """

    def fn(c: Tensor, ed: int) -> Tensor:
        event = c.shape[c.dim() - ed :]
        c = c.reshape(*c.shape[: c.dim() - ed], *([1] * inner), *event)
        return c.expand(*lead, *event).reshape(-1, *event)

    return map_cond(fn, cond, event_dims)


def cat_cond(a: Condition, b: Condition) -> Condition:
    """Concatenate two flattened conditions along the batch dim."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


def check_text_condition(features: Tensor, mask: Tensor, width: int, batch: torch.Size | None = None) -> None:
    """Check a text condition ``(features (*batch, L, width), mask (*batch, L))`` (shapes and dtypes only,
    never values, so no device synchronisation); ``batch`` also checks the leading shape."""
    lead = len(batch) if batch is not None else None
    if (features.dim() < 2 if lead is None else features.dim() != lead + 2) or features.shape[-1] != width:
        want = "(N, L" if batch is None else f"(*batch, L) with batch {tuple(batch)}, i.e. (*batch, L"
        raise ValueError(
            f"cond: expected text features of width {width}, shape {want}, {width}), got features of shape "
            f"{tuple(features.shape)}"
        )
    if batch is not None and features.shape[:lead] != batch:
        raise ValueError(
            f"cond: expected batch shape {tuple(batch)} (one condition per data point), got "
            f"{tuple(features.shape[:lead])} (features of shape {tuple(features.shape)})"
        )
    if not features.is_floating_point():
        raise ValueError(f"cond: expected floating-point text features, got dtype {features.dtype}")
    if mask.shape != features.shape[:-1]:
        raise ValueError(
            f"cond: expected a mask of shape {tuple(features.shape[:-1])} matching the features "
            f"{tuple(features.shape)}, got {tuple(mask.shape)}"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"cond: expected a bool (or integer 0/1) mask, got dtype {mask.dtype}")


def condition_event_dims(num_classes: int | None, text_features: int | None) -> EventDims | None:
    """Trailing dims of one condition of a network config: 0 (class index), ``(2, 1)`` (text features,
    mask) or ``None`` (unconditional)."""
    if num_classes is not None:
        return 0
    if text_features is not None:
        return (2, 1)
    return None
