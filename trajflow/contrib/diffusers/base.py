"""The base of the adapters of diffusers networks: the time conversion, local loading and saving."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ...checkpoint import Pretrained
from ...velocity import VelocityModel

__all__ = ["DiffusersVelocity"]


def _diffusers_class(name: str) -> type[nn.Module]:
    """The class ``diffusers.<name>``, importing diffusers now; an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"trajflow.contrib.diffusers: wrapping a {name} needs the diffusers package: pip install diffusers "
            "(or trajflow[vae]); models are read from local folders only, nothing is downloaded"
        ) from e
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ImportError(
            f"trajflow.contrib.diffusers: the installed diffusers {diffusers.__version__} has no {name}; "
            "upgrade it (pip install -U diffusers)"
        )
    return cls


def _json_config(model: nn.Module) -> dict[str, Any]:
    """A diffusers model's config without diffusers' private keys (``_class_name``, ``_diffusers_version``...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}


V = TypeVar("V", bound="DiffusersVelocity")


class DiffusersVelocity(Pretrained, VelocityModel):
    r"""Base of the adapters of diffusers networks: the time conversion, local loading and saving.

    A subclass names the diffusers class it wraps (``diffusers_class``) and implements ``forward``; it calls
    the network at :meth:`timestep` and returns its output as :math:`v = \epsilon - x_0` (the module
    docstring gives diffusers' convention, which is trajflow's with :math:`\sigma = t`). The network is
    :attr:`model`, a submodule: it is fine-tuned with the adapter and deep-copied with it.

    Arguments:
        model: The diffusers network, an instance of ``diffusers_class``.
        num_train_timesteps: diffusers' timestep of :math:`t = 1` (the scheduler's ``num_train_timesteps``).
        validate_args: Check the values of ``t`` (in [0, 1]) and of the condition (a GPU synchronisation;
            switch it off in a tuned training loop). Shapes and dtypes are always checked.
    """

    diffusers_class: ClassVar[str] = ""
    model_argument: ClassVar[str] = "model"  # the constructor argument's name, for error messages

    def __init__(self, model: nn.Module, *, num_train_timesteps: int = 1000, validate_args: bool = True) -> None:
        super().__init__()
        expected = _diffusers_class(self.diffusers_class)
        if not isinstance(model, expected):
            raise ValueError(
                f"{self.model_argument}: expected a diffusers {self.diffusers_class}, got {type(model).__name__}"
            )
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected a positive integer, got {num_train_timesteps!r}")
        self.model = model
        self.num_train_timesteps = num_train_timesteps
        self.validate_args = bool(validate_args)

    def timestep(self, t: Tensor) -> Tensor:
        r"""diffusers' timestep of trajflow's time: ``num_train_timesteps * t`` (``timesteps = sigmas * 1000``)."""
        return self.num_train_timesteps * t

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments other than the network (JSON-serialisable)."""
        return {"num_train_timesteps": self.num_train_timesteps, "validate_args": self.validate_args}

    def config_dict(self) -> dict[str, Any]:
        """``{"model": <the network's diffusers config>, **settings}``: an untrained copy is built from it."""
        return {"model": _json_config(self.model), **self.settings()}

    @classmethod
    def from_config(cls: type[V], config: Mapping[str, Any]) -> V:
        settings = {k: v for k, v in config.items() if k != "model"}
        return cls(_diffusers_class(cls.diffusers_class).from_config(dict(config["model"])), **settings)

    @classmethod
    def from_diffusers(
        cls: type[V],
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> V:
        """The adapter of the network saved in the **local** diffusers folder ``path`` (``config.json`` and weights).

        Loads with ``from_pretrained(..., local_files_only=True)``: nothing is downloaded from a hub.

        Arguments:
            path: A folder written by diffusers' ``save_pretrained`` (or a pipeline folder, with ``subfolder``).
            subfolder: The network's folder inside ``path``, e.g. ``"unet"`` for a pipeline.
            torch_dtype: The dtype of the weights, as diffusers' ``from_pretrained``.
            **kwargs: The adapter's keyword arguments (``num_train_timesteps``, ...).
        """
        folder = Path(path).expanduser()
        where = folder / subfolder if subfolder else folder
        if not where.is_dir():
            raise ValueError(
                f"path: expected a local folder holding a diffusers {cls.diffusers_class} (config.json and "
                f"weights), got {str(where)!r}, which is not a folder; nothing is downloaded from a hub"
            )
        config_file = where / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"path: expected a diffusers {cls.diffusers_class} folder with a config.json, but "
                f"{str(config_file)!r} does not exist"
            )
        try:
            written_by = json.loads(config_file.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"path: {str(config_file)!r} is not a diffusers config (JSON object): {e}") from e
        if written_by is not None and written_by != cls.diffusers_class:
            raise ValueError(
                f"path: {str(config_file)!r} describes a diffusers {written_by}, expected a "
                f"{cls.diffusers_class} (use the adapter of that class)"
            )
        model = _diffusers_class(cls.diffusers_class).from_pretrained(
            str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype
        )
        return cls(model, **kwargs)

    def save_diffusers(self, directory: str | os.PathLike) -> Path:
        """Write the network as a diffusers folder (its ``save_pretrained``), readable by :meth:`from_diffusers`.

        Only the network is written; the adapter's own settings are not (pass them to :meth:`from_diffusers`).
        Use :meth:`save_pretrained` to keep them.
        """
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        return directory
