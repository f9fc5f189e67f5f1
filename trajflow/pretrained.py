r"""``save_pretrained`` / ``from_pretrained``: one folder per trained model, readable without running code.

A pretrained folder holds two files, each written atomically (:func:`~trajflow.checkpoint.atomic_write`)::

    DIR/config.json          {"format": "trajflow-pretrained/1", "class": "<class name>", "config": {...}}
    DIR/model.safetensors    the parameters and persistent buffers

``config`` is everything the class needs to build an untrained copy of the model (:meth:`Pretrained.config_dict`
and :meth:`Pretrained.from_config`); the weights then load into it. Safetensors holds raw tensors only, so
loading has ``weights_only`` semantics: nothing is unpickled and no code from the folder runs. A folder
written by another class, or, when the caller says what config to expect, by another config, is refused
with a ``ValueError`` that names the class or every differing field.

A model that is built from parts (an :class:`~trajflow.NTM` from a transporter and a predictor) stores each
part's ``{"class": ..., "config": ...}`` inside its own config (:func:`part_config`, :func:`build_part`).

Example:
    >>> import tempfile
    >>> import torch
    >>> class Affine(Pretrained, torch.nn.Module):
    ...     def __init__(self, features: int):
    ...         super().__init__()
    ...         self.features = features
    ...         self.linear = torch.nn.Linear(features, features)
    ...     def config_dict(self):  # from_config's default, cls(**config), rebuilds it
    ...         return {"features": self.features}
    >>> model = Affine(3)
    >>> folder = model.save_pretrained(tempfile.mkdtemp())
    >>> again = Affine.from_pretrained(folder)
    >>> torch.equal(again.linear.weight, model.linear.weight)
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .checkpoint import CONFIG_FILE, MODEL_FILE, check_config, load_json, load_model_weights, save_model

__all__ = [
    "Pretrained",
    "PRETRAINED_FORMAT",
    "read_pretrained_config",
    "part_config",
    "build_part",
    "dataclass_from_dict",
]

PRETRAINED_FORMAT = "trajflow-pretrained/1"

P = TypeVar("P", bound="Pretrained")
D = TypeVar("D")

# class name -> class, for every subclass of Pretrained (filled by __init_subclass__)
_REGISTRY: dict[str, type[Pretrained]] = {}


class Pretrained:
    """Mixin for ``nn.Module`` classes that can be saved to and rebuilt from a pretrained folder.

    Subclasses implement :meth:`config_dict` (JSON-serialisable constructor arguments) and, where those are
    not simply the constructor's keyword arguments, :meth:`from_config`; they get :meth:`save_pretrained` and
    :meth:`from_pretrained`.
    Class names must be unique among subclasses: the folder records the name, and
    ``Base.from_pretrained(dir)`` on a base class rebuilds whichever registered subclass wrote ``dir``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        other = _REGISTRY.get(cls.__name__)
        if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            # Two classes of one name would make folders ambiguous. (A re-definition of the same class, from a
            # reloaded module or a re-run doctest, takes the name over.)
            raise TypeError(
                f"Pretrained: the class name {cls.__name__!r} is already used by {other.__module__}."
                f"{other.__qualname__}; pretrained folders record class names, so they must be unique"
            )
        _REGISTRY[cls.__name__] = cls

    def config_dict(self) -> dict[str, Any]:
        """The JSON-serialisable arguments :meth:`from_config` rebuilds this model from."""
        raise NotImplementedError(f"{type(self).__name__}: config_dict is not implemented")

    @classmethod
    def from_config(cls: type[P], config: Mapping[str, Any]) -> P:
        """An untrained model built from :meth:`config_dict`'s output: by default ``cls(**config)``, right
        for classes whose config is their constructor's keyword arguments; override it otherwise."""
        return cls(**config)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed); returns it."""
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__}: save_pretrained needs an nn.Module")
        config = _json_checked(self.config_dict(), type(self).__name__)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"format": PRETRAINED_FORMAT, "class": type(self).__name__, "config": config}
        # The metadata also keeps safetensors 0.8 readable for a model without parameters: an empty file
        # written with empty metadata cannot be opened again.
        save_model(directory, self, record, metadata={"format": PRETRAINED_FORMAT})
        return directory

    @classmethod
    def from_pretrained(
        cls: type[P],
        directory: str | os.PathLike,
        *,
        config: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> P:
        """Rebuild the model saved in ``directory`` (by :meth:`save_pretrained`) and load its weights.

        Arguments:
            directory: A pretrained folder.
            config: If given, the config the caller expects; a folder whose config differs is refused with
                the differing fields named.
            device: Where the model goes.

        Raises:
            FileNotFoundError: ``directory`` is not a pretrained folder.
            ValueError: It was written by a class that is not ``cls`` (or a subclass), or with another
                ``config``, or its weights do not fit.
        """
        saved = read_pretrained_config(directory)
        target = _REGISTRY.get(saved["class"])
        if target is None or not issubclass(target, cls):
            raise ValueError(
                f"directory: {str(directory)!r} holds a pretrained {saved['class']}, not a {cls.__name__}"
            )
        if config is not None:
            check_config(dict(config), saved["config"], source=f"the pretrained folder {str(directory)!r}")
        model = target.from_config(saved["config"])
        load_model_weights(directory, model)  # safetensors: raw tensors only, nothing unpickled
        return model.to(device)


def read_pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``{"format", "class", "config"}`` record of a pretrained folder, checked for its format."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"directory: expected a pretrained folder with {CONFIG_FILE} and {MODEL_FILE}, got {str(path)!r}"
        )
    record = load_json(path / CONFIG_FILE)
    if not isinstance(record, dict) or record.get("format") != PRETRAINED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"directory: {str(path)!r} is not a {PRETRAINED_FORMAT} folder (format: {found!r}); a training "
            f"checkpoint step folder is loaded with trajflow.checkpoint.load_model_weights instead"
        )
    return record


def part_config(module: nn.Module, name: str) -> dict[str, Any]:
    """``{"class": ..., "config": ...}`` of a part of a composite model (e.g. an NTM's transporter).

    Raises a ``TypeError`` naming the part when it cannot be rebuilt from a config (a part's own parts are
    named after it: ``"predictor: velocity: ..."``).
    """
    if not isinstance(module, Pretrained):
        raise TypeError(
            f"{name}: a {type(module).__name__} cannot be saved with save_pretrained (it does not implement "
            f"trajflow.pretrained.Pretrained); save its state_dict and rebuild it in code instead"
        )
    try:
        config = module.config_dict()
    except (TypeError, NotImplementedError) as e:
        # A Pretrained class may still hold something no config can describe (a user-supplied flow);
        # say which part of the composite model it is.
        raise TypeError(f"{name}: {e}") from e
    return {"class": type(module).__name__, "config": _json_checked(config, name)}


def build_part(record: Mapping[str, Any], name: str) -> nn.Module:
    """Build an untrained part from :func:`part_config`'s record."""
    cls = _REGISTRY.get(str(record.get("class")))
    if cls is None:
        raise ValueError(f"{name}: unknown pretrained class {record.get('class')!r} (known: {sorted(_REGISTRY)})")
    return cls.from_config(record["config"])  # type: ignore[return-value]


def dataclass_from_dict(config_class: type[D], config: Mapping[str, Any], name: str) -> D:
    """``config_class(**config)`` for a config dataclass, refusing fields it does not have by name.

    Fields missing from ``config`` take their defaults (a folder written before a field was added still
    loads); unknown ones are an error rather than silently dropped.

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
    known = [f.name for f in dataclasses.fields(config_class)]  # type: ignore[arg-type]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{name}: {config_class.__name__} has no field(s) {unknown} (known: {known})")
    return config_class(**config)


def _json_checked(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``config`` as plain JSON (tuples become lists), or a ``TypeError`` naming the field that is not."""
    for key, value in config.items():
        try:
            json.dumps(value)
        except TypeError as e:
            raise TypeError(
                f"{name}: config field {key!r} is a {type(value).__name__}, which JSON cannot hold"
            ) from e
    return json.loads(json.dumps(dict(config)))
