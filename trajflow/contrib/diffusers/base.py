"""The base of the adapters of diffusers networks: the time conversion, the call checks, local loading and saving."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ...checkpoint import Pretrained
from ...checkpoint.configs import json_checked
from ...checks import check_count, check_tensor, check_times
from ...nn.patches import check_images
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


def _local_json(folder: Path, file: str, what: str, hint: str = "") -> dict[str, Any]:
    """``folder/file`` as a JSON object, ``folder`` being a local folder holding ``what``; a ValueError naming
    the folder or the file otherwise (``hint`` added where the file is missing; nothing is fetched from a hub)."""
    if not folder.is_dir():
        raise ValueError(
            f"path: expected a local {what}, got {str(folder)!r}, which is not a folder; nothing is downloaded "
            "from a hub"
        )
    path = folder / file
    if not path.is_file():
        raise ValueError(f"path: expected a {what} with a {file}, but {str(path)!r} does not exist{hint}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {str(path)!r} is not a diffusers {file} (a JSON object): {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"path: {str(path)!r} is not a diffusers {file} (a JSON object)")
    return record


def _image_size(name: str, size: object, what: str) -> tuple[int, int]:
    """``(H, W)`` of a positive int or pair; a ValueError naming ``name`` otherwise (``what`` names the model)."""
    if size is None:
        raise ValueError(f"{name}: {what} has no sample size in its config, expected the latent (H, W), got None")
    pair = (size, size) if isinstance(size, int) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name}: expected a positive int or (H, W), got {size!r}")
    return check_count(name, pair[0]), check_count(name, pair[1])


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
    event_shape: torch.Size

    def __init__(self, model: nn.Module, *, num_train_timesteps: int = 1000, validate_args: bool = True) -> None:
        super().__init__()
        if not isinstance(model, _diffusers_class(self.diffusers_class)):
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

    def _check_inputs(self, x_t: Tensor, t: Tensor) -> None:
        """``x_t`` ``(N, *event_shape)`` and ``t`` one float time per row (in [0, 1] with ``validate_args``)."""
        check_images("x_t", x_t, self.event_shape, flat=True)
        check_tensor("t", t)
        if t.shape != x_t.shape[:1] or not t.is_floating_point():
            raise ValueError(
                f"t: expected a float tensor of shape ({x_t.shape[0]},) (one time per row of x_t), got {t.dtype} "
                f"of shape {tuple(t.shape)}"
            )
        if self.validate_args:
            check_times("t", t)

    @staticmethod
    def _hooked(layer: nn.Module, call: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """``call()`` and what ``layer`` read during it (a forward pre-hook that lives for the call only)."""
        captured: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            out = call()
        finally:
            handle.remove()
        return out, captured[-1]

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments other than the network (JSON-serialisable)."""
        return {"num_train_timesteps": self.num_train_timesteps, "validate_args": self.validate_args}

    def config_dict(self) -> dict[str, Any]:
        """``{"model": <the network's diffusers config>, **settings}``: an untrained copy is built from it."""
        # without diffusers' private keys (_class_name, _diffusers_version, ...)
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        return {"model": json_checked(config, self.diffusers_class), **self.settings()}

    @classmethod
    def from_config(cls: type[V], config: Mapping[str, Any]) -> V:
        settings = dict(config)
        model = _diffusers_class(cls.diffusers_class).from_config(dict(settings.pop("model")))
        return cls(model, **cls._settings_from_config(model, settings))

    @classmethod
    def _settings_from_config(cls, model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
        """The constructor's keyword arguments of the saved ``settings`` (a subclass may rebuild some)."""
        return settings

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
        written_by = _local_json(where, "config.json", f"folder holding a diffusers {cls.diffusers_class}").get(
            "_class_name"
        )
        if written_by is not None and written_by != cls.diffusers_class:
            raise ValueError(
                f"path: {str(where / 'config.json')!r} describes a diffusers {written_by}, expected a "
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
        self.model.save_pretrained(str(directory))
        return Path(directory)
