r"""``save_pretrained`` / ``from_pretrained``: one folder per trained model, readable without running code.

A pretrained folder holds two files, each written atomically (:func:`~trajflow.checkpoint.atomic_write`)::

    DIR/model.safetensors    the parameters and persistent buffers (written first)
    DIR/config.json          {"format": "trajflow-pretrained/1", "class": "<class name>", "config": {...},
                              "weights_sha256": "<sha256 of model.safetensors>"}

``config`` builds an untrained copy (:meth:`Pretrained.config_dict`, :meth:`Pretrained.from_config`) into
which the weights load. Nothing is unpickled and no code from the folder runs, and loading checks the folder
before trusting it (:meth:`Pretrained.from_pretrained` lists every refusal, each naming the file). A model
built from parts (an :class:`~trajflow.NTM`) stores each part's ``{"class": ..., "config": ...}`` in its own
config (:func:`part_config`, :func:`build_part`).

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

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .configs import check_config, check_config_keys, json_checked
from .files import CONFIG_FILE, MODEL_FILE, file_sha256, load_safetensors, save_json, save_safetensors

__all__ = [
    "Pretrained",
    "PRETRAINED_FORMAT",
    "read_pretrained_config",
    "part_config",
    "build_part",
    "load_pretrained_weights",
]

PRETRAINED_FORMAT = "trajflow-pretrained/1"

# The fields of config.json; weights_sha256 is absent from folders written before it was recorded.
_RECORD_FIELDS = ("format", "class", "config", "weights_sha256")

P = TypeVar("P", bound="Pretrained")

# class name -> class, for every subclass of Pretrained (filled by __init_subclass__)
_REGISTRY: dict[str, type[Pretrained]] = {}


class Pretrained:
    """Mixin for ``nn.Module`` classes that can be saved to and rebuilt from a pretrained folder.

    Subclasses implement :meth:`config_dict` (JSON-serialisable constructor arguments) and, where those are
    not the constructor's keyword arguments, :meth:`from_config`. Class names must be unique among
    subclasses: the folder records the name, and ``Base.from_pretrained(dir)`` rebuilds whichever registered
    subclass wrote ``dir``.
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
        for classes whose config is their constructor's keyword arguments; override it otherwise.

        A field the constructor does not take is refused by name (:func:`check_config_keys`)."""
        check_config_keys(cls, config)
        return cls(**config)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and then ``config.json`` (with the weights' sha256) into ``directory``
        (created if needed); returns it."""
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__}: save_pretrained needs an nn.Module")
        config = json_checked(self.config_dict(), type(self).__name__)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The metadata also keeps safetensors 0.8 readable for a model without parameters: an empty file
        # written with empty metadata cannot be opened again.
        weights = save_safetensors(directory / MODEL_FILE, self.state_dict(), {"format": PRETRAINED_FORMAT})
        record = {
            "format": PRETRAINED_FORMAT,
            "class": type(self).__name__,
            "config": config,
            "weights_sha256": file_sha256(weights),
        }
        save_json(directory / CONFIG_FILE, record)  # last: it names the weights it was written with
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
            device: Where the model goes. Its dtype is the saved weights' (see :func:`load_pretrained_weights`).

        Raises:
            FileNotFoundError: ``directory`` is not a pretrained folder (a file is missing).
            TypeError: ``directory`` is not a path, or ``config`` not a mapping.
            ValueError: The folder is damaged or does not describe a ``cls``, naming the file: a bad
                ``config.json`` (:func:`read_pretrained_config`); another class than ``cls`` (or a subclass);
                another ``config`` than the expected one or one that does not build a model; bad weights
                (:func:`load_pretrained_weights`).
        """
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping (the expected config) or None, got {type(config).__name__}")
        saved = read_pretrained_config(directory)
        target = _REGISTRY.get(saved["class"])
        if target is None or not issubclass(target, cls):
            raise ValueError(f"directory: {str(directory)!r} holds a pretrained {saved['class']}, not a {cls.__name__}")
        if config is not None:
            check_config(dict(config), saved["config"], source=f"the pretrained folder {str(directory)!r}")
        model = _build(target, saved["config"], str(Path(directory) / CONFIG_FILE))
        load_pretrained_weights(directory, model, sha256=saved.get("weights_sha256"))
        return model.to(device)


def _build(cls: type[P], config: dict[str, Any], where: str) -> P:
    try:
        return cls.from_config(config)
    except Exception as e:  # the config comes from a file: any failure to build from it is a bad file
        raise ValueError(f"directory: the config in {where!r} does not build a {cls.__name__}: {e}") from e


def load_pretrained_weights(directory: str | os.PathLike, model: nn.Module, *, sha256: str | None = None) -> None:
    """Load ``directory/model.safetensors`` into ``model`` after checking it; nothing is unpickled.

    Arguments:
        directory: The pretrained folder.
        model: The model its config builds; loaded in place (values are copied into its tensors). When the
            file's floating tensors share one dtype, the model is first moved to it (a float64 model comes
            back float64); otherwise each tensor is cast to the dtype the model was built with.
        sha256: The checksum ``config.json`` records, or ``None`` to skip that check (older folders).

    Raises:
        ValueError: naming the file, when it does not match ``sha256``, is not a readable safetensors file,
            lacks a tensor of ``model`` or holds one it does not have, has a tensor of another shape (the
            first such mismatch is named, with both shapes) or holds NaN/inf values.
    """
    path = Path(directory) / MODEL_FILE
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(
            f"directory: {str(path)!r} does not match the sha256 that {CONFIG_FILE} records (expected "
            f"{sha256}, got {file_sha256(path)}): the file is damaged or was replaced"
        )
    try:
        state, _ = load_safetensors(path)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
        raise ValueError(f"directory: {str(path)!r} is not a readable safetensors file: {e}") from e
    _check_fit(path, state, model)
    _check_finite(path, state)
    saved_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(saved_dtypes) == 1:  # a model saved in one dtype comes back in it, not rounded to the built one
        model.to(saved_dtypes.pop())
    model.load_state_dict(state)


def _check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"directory: {str(path)!r} holds {bad} NaN/inf value(s) in {k}; expected finite weights")


def _check_fit(path: Path, state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise unless the weights in ``path`` (``state``) have exactly ``model``'s tensor names and shapes."""
    expected = model.state_dict()
    builds = f"directory: the weights in {str(path)!r} do not fit the {type(model).__name__} its {CONFIG_FILE} builds"
    if set(state) != set(expected):
        missing, unexpected = _absent(expected, state), _absent(state, expected)
        raise ValueError(f"{builds}: missing {_first_names(missing)}, unexpected {_first_names(unexpected)}")
    mismatched = [k for k, v in expected.items() if state[k].shape != v.shape]
    if mismatched:
        first = mismatched[0]
        raise ValueError(
            f"{builds}: {first} has shape {tuple(state[first].shape)} in the file, the model expects "
            f"{tuple(expected[first].shape)} (the first of {len(mismatched)} mismatched tensor(s))"
        )


def _absent(names: Mapping[str, Any], among: Mapping[str, Any]) -> list[str]:
    return [k for k in names if k not in among]


def _first_names(names: list[str]) -> str:
    """The first five names, and ``...`` when there are more."""
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def read_pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``{"format", "class", "config"[, "weights_sha256"]}`` record of a pretrained folder, checked.

    Raises:
        TypeError: ``directory`` is not a path.
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: naming ``config.json``, when it is not valid UTF-8 JSON, is not of the pretrained format,
            has a field that is not one of the record's (named) or fields of the wrong type.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got {type(directory).__name__}")
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"directory: expected a pretrained folder with {CONFIG_FILE} and {MODEL_FILE}, got {str(path)!r}"
        )
    record = _read_record(path)
    _check_record_fields(record, str(path / CONFIG_FILE))
    return record


def _read_record(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict of the pretrained format (what a training step folder's is not)."""
    where = str(path / CONFIG_FILE)
    try:
        record = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise ValueError(f"directory: {where!r} is not valid JSON: {e}") from e
    if not isinstance(record, dict) or record.get("format") != PRETRAINED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"directory: {str(path)!r} is not a {PRETRAINED_FORMAT} folder (format: {found!r}); a training "
            f"checkpoint step folder is loaded with trajflow.checkpoint.load_model_weights instead"
        )
    return record


def _check_record_fields(record: dict[str, Any], where: str) -> None:
    """Raise unless the record has only its known fields, of their types."""
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    if unknown:
        raise ValueError(f"directory: {where!r} has unknown field(s) {unknown} (known: {list(_RECORD_FIELDS)})")
    if not isinstance(record.get("class"), str) or not isinstance(record.get("config"), dict):
        raise ValueError(
            f"directory: {where!r} expected a string 'class' and an object 'config', got "
            f"{type(record.get('class')).__name__} and {type(record.get('config')).__name__}"
        )
    sha = record.get("weights_sha256")
    if not _is_sha256_or_none(sha):
        raise ValueError(f"directory: {where!r} expected 'weights_sha256' to be 64 hex digits, got {sha!r}")


def _is_sha256_or_none(sha: object) -> bool:
    return sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None)


def part_config(module: nn.Module, name: str) -> dict[str, Any]:
    """``{"class": ..., "config": ...}`` of a part of a composite model (e.g. an NTM's transporter).

    Raises a ``TypeError`` naming the part when it cannot be rebuilt from a config (a part's own parts are
    named after it: ``"predictor: velocity: ..."``).
    """
    if not isinstance(module, Pretrained):
        raise TypeError(
            f"{name}: a {type(module).__name__} cannot be saved with save_pretrained (it does not implement "
            f"trajflow.checkpoint.Pretrained); save its state_dict and rebuild it in code instead"
        )
    try:
        config = module.config_dict()
    except (TypeError, NotImplementedError) as e:
        # A Pretrained class may still hold something no config can describe (a user-supplied flow);
        # say which part of the composite model it is.
        raise TypeError(f"{name}: {e}") from e
    return {"class": type(module).__name__, "config": json_checked(config, name)}


def build_part(record: Mapping[str, Any], name: str) -> nn.Module:
    """Build an untrained part from :func:`part_config`'s record ``{"class": ..., "config": {...}}``.

    A record of another form (not a mapping, a missing or unknown field, a config that is not a mapping) or
    an unknown class is refused with a ``ValueError`` naming the part."""
    if not isinstance(record, Mapping):
        raise ValueError(f'{name}: expected a part record {{"class": ..., "config": {{...}}}}, got {record!r}')
    unknown = sorted(set(record) - {"class", "config"})
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown} in a part record (known: ['class', 'config'])")
    cls = _REGISTRY.get(record["class"]) if isinstance(record.get("class"), str) else None
    if cls is None:
        raise ValueError(f"{name}: unknown pretrained class {record.get('class')!r} (known: {sorted(_REGISTRY)})")
    if not isinstance(record.get("config"), Mapping):
        raise ValueError(f"{name}: expected a mapping as the config of {cls.__name__}, got {record.get('config')!r}")
    try:
        return cls.from_config(record["config"])  # type: ignore[return-value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from e
