"""Configs read back from folders: compared field by field (:func:`check_config`, so a checkpoint is never
silently loaded into a differently-shaped or differently-trained model), and fields a class does not have
refused by name."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "config_differences",
    "check_config",
    "check_config_keys",
    "check_renamed_fields",
    "dataclass_from_dict",
]

D = TypeVar("D")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted field: value}`` of a nested JSON config, an empty dict kept as a value."""
    if not isinstance(obj, Mapping) or (not obj and prefix):
        return {prefix[:-1]: obj}
    return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


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
    # Through JSON, as a config read back from a file: tuples compare as the lists they become there.
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


def check_config_keys(cls: type, config: Mapping[str, Any], *, known: Sequence[str] | None = None) -> None:
    """Raise a ``ValueError`` naming ``cls`` and every field of ``config`` it does not take.

    ``known`` lists the fields; by default the keyword arguments of ``cls``'s constructor (no check when it
    takes ``**kwargs``: the class checks those itself).

    Example:
        >>> class Box:
        ...     def __init__(self, width: int = 1): ...
        >>> check_config_keys(Box, {"width": 2, "colour": "red"})
        Traceback (most recent call last):
        ...
        ValueError: config: Box has no field(s) ['colour'] (known: ['width'])
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a mapping of {cls.__name__}'s fields, got {type(config).__name__}")
    known = _keyword_names(cls) if known is None else known
    if known is not None:
        _refuse_unknown(cls, config, sorted(known), "config")


def _keyword_names(cls: type) -> list[str] | None:
    """The keyword arguments of ``cls``'s constructor, or None when it takes ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    no_check = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return None if no_check else [p.name for p in params if p.kind in kinds]


def _refuse_unknown(cls: type, config: Mapping[str, Any], known: list[str], name: str) -> None:
    unknown = sorted(str(k) for k in set(config) - set(known))
    if unknown:
        raise ValueError(f"{name}: {cls.__name__} has no field(s) {unknown} (known: {known})")


def dataclass_from_dict(config_class: type[D], config: Mapping[str, Any], name: str) -> D:
    """``config_class(**config)`` for a config dataclass; missing fields take their defaults (older folders
    load), unknown ones are refused by name and renamed ones with their new name (:func:`check_renamed_fields`).

    Example:
        >>> @dataclasses.dataclass
        ... class Size:
        ...     width: int = 4
        >>> dataclass_from_dict(Size, {"width": 8}, "config")
        Size(width=8)
        >>> dataclass_from_dict(Size, {"width": 8, "depth": 2}, "config")
        Traceback (most recent call last):
        ...
        ValueError: config: Size has no field(s) ['depth'] (known: ['width'])
    """
    check_renamed_fields(config_class, config, name)
    _refuse_unknown(config_class, config, [f.name for f in dataclasses.fields(config_class)], name)  # type: ignore[arg-type]
    return config_class(**config)


def json_checked(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``config`` as plain JSON (tuples become lists), or a ``TypeError`` naming the field that is not."""
    for key, value in config.items():
        try:
            json.dumps(value)
        except TypeError as e:
            raise TypeError(f"{name}: config field {key!r} is a {type(value).__name__}, which JSON cannot hold") from e
    return json.loads(json.dumps(dict(config)))


def check_renamed_fields(config_class: type, config: Mapping[str, Any], name: str, source: str = "") -> None:
    """Raise a ``ValueError`` naming the old and the new key of every field of ``config`` that ``config_class``
    has renamed (its ``renamed_fields``, ``{old: new}``); ``name`` is the dotted place of ``config``
    (``"config.train"``) and ``source`` where it was read from.

    Example:
        >>> from trajflow.train import TrainerConfig
        >>> check_renamed_fields(TrainerConfig, {"steps": 100}, "config.train")
        Traceback (most recent call last):
        ...
        ValueError: config.train.steps: renamed config.train.max_steps in trajflow 0.3.0; rename the key
    """
    renamed: Mapping[str, str] = getattr(config_class, "renamed_fields", {})
    old = [k for k in config if k in renamed]
    if old:
        where = f" (in {source})" if source else ""
        raise ValueError(
            "; ".join(f"{name}.{k}: renamed {name}.{renamed[k]} in trajflow 0.3.0" for k in old)
            + f"{where}; rename the key"
        )
