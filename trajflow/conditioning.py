"""Conditions: a tensor (class index, vector) or a tuple of tensors (text features and their mask).

A network says how many trailing dims form one condition (``cond_event_dims``: an int for a tensor, a
tuple of ints for a tuple); the leading dims are the condition's batch shape. Where it knows more (the
number of classes, the widths), it declares a :class:`CondSpec` as ``cond_spec``, in the way of
torch.distributions' ``arg_constraints``.

**One check, at the edge.** :func:`check_cond` is the library's one condition validator: the public entry
points (the constructors of :class:`~trajflow.TrajectoryDistribution` and of the losses' draws, sampling)
call it once, with the network that will see the condition, and raise a ``ValueError`` naming ``cond``,
what was expected and what was given. The networks trust their callers. :func:`check_drop_cond` checks the
guidance-dropout mask likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Condition = Tensor | tuple[Tensor, ...]
EventDims = int | tuple[int, ...]

__all__ = [
    "Condition",
    "EventDims",
    "CondPart",
    "CondSpec",
    "ConditionFields",
    "check_cond",
    "check_drop_cond",
    "cond_spec_of",
    "map_cond",
    "align_cond",
    "cat_cond",
]


def map_cond(fn: Callable[[Tensor, int], Tensor], cond: Condition, event_dims: EventDims) -> Condition:
    """Apply ``fn(tensor, event_dims)`` to every part of ``cond`` (checked at the edge by :func:`check_cond`)."""
    if isinstance(cond, Tensor):
        return fn(cond, event_dims)  # type: ignore[arg-type]
    return tuple(fn(c, ed) for c, ed in zip(cond, event_dims))  # type: ignore[arg-type]


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


# -- the one check -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CondPart:
    """One tensor of a condition.

    Attributes:
        what: Its name in messages, e.g. ``"class indices"``, ``"text features"``, ``"a mask"``.
        shape: Its event shape: an int is a fixed size, a str a length shared by the parts that name it
            (the ``L`` of text features and their mask), ``None`` any size.
        dtype: ``"float"``, ``"integer"`` (not bool), ``"mask"`` (bool or integer 0/1) or ``"any"``.
        num_classes: For integer parts: the values lie in ``[0, num_classes)`` (checked with ``validate``).
        finite: The values must be finite (checked with ``validate``); text features need not be, as their
            padding never reaches the network.
    """

    what: str
    shape: tuple[int | str | None, ...] = ()
    dtype: str = "any"
    num_classes: int | None = None
    finite: bool = False

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.what} (*batch{', ' + dims if dims else ''})"


@dataclass(frozen=True)
class CondSpec:
    """The condition a network takes: one tensor (one part) or a tuple of tensors (several parts).

    Attributes:
        parts: The tensors, in order.
        null: Whether ``cond=None`` (the null condition everywhere) is allowed.
        hint: Added to the messages about values and about a missing condition (e.g. a reserved label).
    """

    parts: tuple[CondPart, ...]
    null: bool = True
    hint: str = ""

    @property
    def event_dims(self) -> EventDims:
        """Trailing dims of one condition, as ``cond_event_dims`` gives them."""
        dims = tuple(len(p.shape) for p in self.parts)
        return dims[0] if len(dims) == 1 else dims

    def describe(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0].describe()
        return f"a tuple ({', '.join(p.describe() for p in self.parts)})"

    @classmethod
    def of(
        cls, *, num_classes: int | None = None, features: int = 0, text_features: int | None = None
    ) -> CondSpec | None:
        """The spec of a class index in ``[0, num_classes)``, a vector of width ``features`` or text
        ``(features (*batch, L, text_features), mask (*batch, L))``; ``None`` (unconditional) for none."""
        if num_classes is not None:
            return cls((CondPart("class indices", (), "integer", num_classes),))
        if features:
            return cls((CondPart("vector condition", (features,), "float", finite=True),))
        if text_features is not None:
            return cls((CondPart("text features", ("L", text_features), "float"), CondPart("a mask", ("L",), "mask")))
        return None

    @classmethod
    def generic(cls, event_dims: EventDims) -> CondSpec:
        """A condition known only by its event dims (e.g. of a user's network)."""
        dims = (event_dims,) if isinstance(event_dims, int) else tuple(event_dims)
        return cls(tuple(CondPart("condition", (None,) * d) for d in dims))


def _check_count_or_none(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")


class ConditionFields:
    """Mixin of the transformer configs' ``num_classes`` / ``text_features`` fields: class labels, text, or
    neither (unconditional); ``text_features=0`` means no text."""

    num_classes: int | None
    text_features: int | None

    def _check_condition(self) -> None:
        if self.text_features == 0:
            self.text_features = None
        for name in ("num_classes", "text_features"):
            _check_count_or_none(name, getattr(self, name))
        if self.num_classes is not None and self.text_features is not None:
            raise ValueError(
                "num_classes, text_features: expected at most one kind of condition, got both "
                f"num_classes={self.num_classes} and text_features={self.text_features}"
            )

    @property
    def cond_spec(self) -> CondSpec | None:
        """The condition: class indices, text ``(features, mask)`` or ``None`` (unconditional)."""
        return CondSpec.of(num_classes=self.num_classes, text_features=self.text_features)

    @property
    def cond_event_dims(self) -> EventDims | None:
        """Trailing dims of one condition: 0 (class), ``(2, 1)`` (text features, mask) or ``None``."""
        spec = self.cond_spec
        return None if spec is None else spec.event_dims


def cond_spec_of(module: object) -> CondSpec | None:
    """``module.cond_spec``, or a generic spec from its ``cond_event_dims``; ``None``: unconditional."""
    spec = getattr(module, "cond_spec", None)
    if spec is None and getattr(module, "cond_event_dims", None) is not None:
        spec = CondSpec.generic(module.cond_event_dims)  # type: ignore[attr-defined]
    return spec


# The steps of check_cond, one concern each (they raise its messages).


def _tensors(cond: object, spec: CondSpec) -> tuple[Tensor, ...]:
    """``cond``'s tensors, one per part of ``spec``, or a ``ValueError`` when its structure differs."""
    n = len(spec.parts)
    if n == 1 and isinstance(cond, Tensor):
        return (cond,)
    if n == 1:
        raise ValueError(f"cond: expected a tensor of {spec.describe()}, got {type(cond).__name__}")
    if isinstance(cond, tuple) and len(cond) == n and all(isinstance(c, Tensor) for c in cond):
        return cond
    raise ValueError(f"cond: expected {spec.describe()}, got {_structure(cond)}")


def _structure(cond: object) -> str:
    if isinstance(cond, Tensor):
        return "a single tensor"
    return f"a tuple of {len(cond)} item(s)" if isinstance(cond, tuple) else type(cond).__name__


def _is_real(c: Tensor) -> bool:
    return c.is_floating_point() or c.is_complex()


# part.dtype -> (whether a tensor has it, what the message expects)
_DTYPES: dict[str, tuple[Callable[[Tensor], bool], str]] = {
    "float": (Tensor.is_floating_point, "floating-point {what}"),
    "integer": (lambda c: not _is_real(c) and c.dtype != torch.bool, "integer {what} (torch.long)"),
    "mask": (lambda c: not _is_real(c), "a bool (or integer 0/1) mask"),
    "any": (lambda c: True, ""),
}


def _check_dtype(c: Tensor, part: CondPart) -> None:
    ok, expected = _DTYPES[part.dtype]
    if not ok(c):
        raise ValueError(f"cond: expected {expected.format(what=part.what)}, got dtype {c.dtype}")


def _batch_of(c: Tensor, part: CondPart, lengths: dict[str, tuple[int, str]]) -> torch.Size:
    """The batch shape of one part, after checking its event shape; ``lengths`` holds the named lengths
    (``"L"``) seen so far, with the part that set them."""
    d = len(part.shape)
    lead, event = c.shape[: c.dim() - d], c.shape[c.dim() - d :]
    if c.dim() < d or any(isinstance(w, int) and w != g for w, g in zip(part.shape, event)):
        raise ValueError(f"cond: expected {part.describe()}, got shape {tuple(c.shape)}")
    for w, g in zip(part.shape, event):
        if isinstance(w, str) and lengths.setdefault(w, (g, part.what))[0] != g:
            _length_mismatch(c, part, lead, event, lengths[w][1], lengths)
    return lead


def _length_mismatch(
    c: Tensor, part: CondPart, lead: torch.Size, event: torch.Size, other: str, lengths: dict[str, tuple[int, str]]
) -> None:
    want = (*lead, *(lengths[v][0] if isinstance(v, str) else e for v, e in zip(part.shape, event)))
    raise ValueError(f"cond: expected {part.what} of shape {want} matching the {other}, got {tuple(c.shape)}")


def _check_values(c: Tensor, part: CondPart, hint: str) -> None:
    """Class ranges and finiteness: these read the values (a device synchronisation on a GPU)."""
    k = part.num_classes
    if k is not None and c.numel() and not bool(((c >= 0) & (c < k)).all()):
        raise ValueError(
            f"cond: expected {part.what} in [0, {k - 1}]{hint}, got values in [{int(c.min())}, {int(c.max())}]"
        )
    if part.finite and not bool(torch.isfinite(c).all()):
        raise ValueError(f"cond: expected finite {part.what}, got {int((~torch.isfinite(c)).sum())} NaN/inf entries")


def check_cond(
    module: object, cond: object, batch: torch.Size | tuple[int, ...] | None = None, *, validate: bool = True
) -> torch.Size:
    """Raise a ``ValueError`` naming ``cond`` unless it is a condition ``module`` takes; return its batch shape.

    Arguments:
        module: The network that will see ``cond``: its ``cond_spec`` (or ``cond_event_dims``) says what it
            takes; neither means unconditional.
        cond: The condition, or ``None`` (the null condition everywhere, where the spec allows it).
        batch: If given, the batch shape ``cond`` must have (one condition per data point).
        validate: Also check values (class ranges, finite vectors); these read the tensors, a device
            synchronisation on a GPU. Types and shapes are always checked.

    Example:
        >>> from trajflow.predictors import MLPPredictor
        >>> check_cond(MLPPredictor(2, num_classes=3), torch.tensor([0, 2]))
        torch.Size([2])
        >>> check_cond(MLPPredictor(2, num_classes=3), torch.tensor([0, 3]))
        Traceback (most recent call last):
        ...
        ValueError: cond: expected class indices in [0, 2], got values in [0, 3]
    """
    spec = cond_spec_of(module)
    if cond is None or spec is None:
        _check_presence(type(module).__name__, cond, spec)
        return torch.Size()
    tensors = _tensors(cond, spec)
    lead = _batch_shape(tensors, spec, batch)
    if validate:
        for c, part in zip(tensors, spec.parts):
            _check_values(c, part, spec.hint)
    return lead


def _check_presence(name: str, cond: object, spec: CondSpec | None) -> None:
    """``cond=None`` for a network that needs a condition, or a condition for an unconditional one."""
    if cond is None and spec is not None and not spec.null:
        raise ValueError(f"cond: {name} is conditional, expected {spec.describe()}, got None{spec.hint}")
    if cond is not None and spec is None:
        raise ValueError(f"cond: {name} is unconditional, expected cond=None, got {type(cond).__name__}")


def _batch_shape(tensors: tuple[Tensor, ...], spec: CondSpec, batch: torch.Size | tuple[int, ...] | None) -> torch.Size:
    """The parts' common batch shape after their dtypes and event shapes are checked (``batch``, if given)."""
    lengths: dict[str, tuple[int, str]] = {}
    leads = []
    for c, part in zip(tensors, spec.parts):
        _check_dtype(c, part)
        leads.append(_batch_of(c, part, lengths))
    if any(lead != leads[0] for lead in leads):
        raise ValueError(f"cond: the parts disagree on the batch shape: {[tuple(c.shape) for c in tensors]}")
    if batch is not None and leads[0] != torch.Size(batch):
        raise ValueError(
            f"cond: expected batch shape {tuple(batch)} (one condition per data point), got {tuple(leads[0])}"
        )
    return leads[0]


def check_drop_cond(drop_cond: object, batch: torch.Size | tuple[int, ...] | None = None) -> Tensor | None:
    """Raise a ``ValueError`` naming ``drop_cond`` unless it is ``None`` or a bool tensor (of shape ``batch``,
    if given): the guidance-dropout mask, True where the null condition replaces ``cond``."""
    if drop_cond is None:
        return None
    if not isinstance(drop_cond, Tensor):
        got = type(drop_cond).__name__
    elif drop_cond.dtype != torch.bool or (batch is not None and drop_cond.shape != torch.Size(batch)):
        got = f"{drop_cond.dtype} of shape {tuple(drop_cond.shape)}"
    else:
        return drop_cond
    want = "a bool tensor" if batch is None else f"a bool tensor of shape {tuple(batch)}"
    raise ValueError(f"drop_cond: expected {want}, got {got}")
