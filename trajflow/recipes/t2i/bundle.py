r"""A trained text-to-image model with everything needed to sample it (:class:`T2IModel`), read from a training
checkpoint (:func:`load_t2i`) or a pretrained folder (:meth:`T2IModel.from_pretrained`).

A pretrained folder is the :mod:`trajflow.checkpoint` format, readable without running code::

    DIR/config.json        {"format": "trajflow-pretrained/1", "class": "T2IModel", "config": <the T2IConfig>}
    DIR/model.safetensors  the network's weights (those the bundle holds: the EMA when it was loaded so)

The frozen text encoder and the VAE are not in it: the config names them (``text``, ``vae``), and they are
rebuilt from there, or handed in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    PRETRAINED_FORMAT,
    check_config,
    load_json,
    load_model_weights,
    read_pretrained_config,
    resolve_checkpoint,
    save_model,
)
from .build import build_model
from .config import T2IConfig
from .sample import DEFAULT_DENOISE_T_MIN, generate
from .text import build_text_encoder
from .vae import VAE, data_shape

__all__ = ["T2IModel", "load_t2i", "load_t2i_config"]


@dataclass
class T2IModel:
    """A trained text-to-image model with everything needed to sample it (see :func:`load_t2i`).

    Attributes:
        model: The network (an :class:`~trajflow.NTM`, or the flow-matching velocity model), in eval mode.
        config: The run's config (it built ``model``).
        encoder: The frozen text encoder.
        vae: The frozen VAE of a latent-space run, or ``None``.
        checkpoint: The step folder or pretrained folder the weights came from.
        data_shape: ``(C, H, W)`` of what ``model`` sees (pixels or latents).
    """

    model: nn.Module
    config: T2IConfig
    encoder: Any
    vae: VAE | None
    checkpoint: Path
    data_shape: tuple[int, int, int]
    path: str = "raw"
    """Default sampling path of :meth:`generate` (see :func:`generate`)."""
    denoiser: Any = None
    """The learned denoiser of the ``"fast"`` path (:func:`~trajflow.denoise.load_denoiser`)."""
    t_min: float | None = None
    """Default cleanest time; ``None``: ``sample.t_min`` on the raw path, 0.02 on the others."""

    @property
    def kind(self) -> str:
        """``config.model.kind``: ``"ntm"``, ``"fm"`` or ``"ntm-fm"``."""
        return self.config.model.kind

    def generate(
        self,
        captions: list[str],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        sampler: str = "euler",
        progress: bool = False,
        path: str | None = None,
        t_min: float | None = None,
        denoiser: Any = None,
    ) -> Tensor:
        """:func:`generate` with this model's defaults (``path``, ``t_min``, ``denoiser`` fields, then
        ``config.sample``) for what is not given."""
        s = self.config.sample
        path = path or self.path
        t_min = t_min if t_min is not None else self.t_min
        if t_min is None:
            t_min = s.t_min if path == "raw" else DEFAULT_DENOISE_T_MIN
        return generate(
            self.model,
            self.encoder,
            captions,
            steps=s.steps if steps is None else steps,
            guidance=s.guidance if guidance is None else guidance,
            seed=seed,
            t_min=t_min,
            shift=self.config.shift_for(self.data_shape),
            batch_size=s.batch_size if batch_size is None else batch_size,
            vae=self.vae,
            sampler=sampler,
            progress=progress,
            path=path,
            denoiser=denoiser if denoiser is not None else self.denoiser,
        )

    # -- pretrained folders ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (the run's config) and ``model.safetensors`` (the network's current weights)
        into ``directory`` (created if needed), each file atomically; returns the folder.

        The encoder and the VAE are not saved: :meth:`from_pretrained` rebuilds them from the config.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"format": PRETRAINED_FORMAT, "class": type(self).__name__, "config": self.config.to_dict()}
        return save_model(directory, self.model, record)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        config: T2IConfig | Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        encoder: Any = None,
        vae: VAE | None = None,
    ) -> T2IModel:
        """Rebuild the model :meth:`save_pretrained` wrote into ``directory``, ready to sample.

        Arguments:
            directory: A pretrained folder.
            config: If given, the config the caller expects (a :class:`T2IConfig` or its dict); a folder
                written with another config is refused with every differing field named.
            device: Where the network (and a rebuilt encoder and VAE) go.
            encoder, vae: A text encoder / VAE to reuse instead of building them from the saved config.

        Raises:
            FileNotFoundError: ``directory`` is not a pretrained folder.
            ValueError: The folder holds another class, was written with another ``config``, or its weights
                do not fit the network its config builds.
        """
        saved = read_pretrained_config(directory)
        if saved["class"] != cls.__name__:
            raise ValueError(f"directory: {str(directory)!r} holds a pretrained {saved['class']}, not a {cls.__name__}")
        if config is not None:
            expected = config.to_dict() if isinstance(config, T2IConfig) else dict(config)
            check_config(expected, saved["config"], source=f"the pretrained folder {str(directory)!r}")
        run = T2IConfig.from_dict(saved["config"])
        bundle = _assemble(run, Path(directory), device, encoder, vae)
        load_model_weights(directory, bundle.model)  # safetensors: raw tensors, nothing unpickled
        return bundle


def _assemble(config: T2IConfig, source: Path, device: str | torch.device, encoder: Any, vae: VAE | None) -> T2IModel:
    """A bundle around an untrained network built from ``config`` (the caller loads the weights)."""
    device = torch.device(device)
    encoder = encoder if encoder is not None else build_text_encoder(config.text, device)
    if vae is None and config.vae:
        vae = VAE(config.vae, device, config.vae_scale)
    shape = data_shape(config, vae)
    model = build_model(config, encoder.feature_dim, shape).to(device).eval()
    return T2IModel(model, config, encoder, vae, source, shape)


def load_t2i(
    checkpoint: str | os.PathLike,
    *,
    ema: bool = True,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    vae: VAE | None = None,
) -> T2IModel:
    """Rebuild a text-to-image model from a training checkpoint (a step folder, or a run folder: its newest
    step) or a pretrained folder (:meth:`T2IModel.from_pretrained`).

    The model is built from the checkpoint's own ``config.json``, so it always fits the weights; ``ema``
    loads the averaged weights when the checkpoint has them (a pretrained folder holds one set of weights).
    """
    config, ckpt = load_t2i_config(checkpoint)
    if _is_pretrained(ckpt):
        return T2IModel.from_pretrained(ckpt, device=device, encoder=encoder, vae=vae)
    bundle = _assemble(config, ckpt, device, encoder, vae)
    load_model_weights(ckpt, bundle.model, ema=ema and (ckpt / EMA_FILE).is_file())
    return bundle


def load_t2i_config(checkpoint: str | os.PathLike) -> tuple[T2IConfig, Path]:
    """The config of a training checkpoint or pretrained folder (nothing is built), and the folder itself
    (a run folder resolves to its newest step, as in :func:`load_t2i`)."""
    ckpt = resolve_checkpoint(checkpoint)
    if _is_pretrained(ckpt):
        return T2IConfig.from_dict(read_pretrained_config(ckpt)["config"]), ckpt
    return T2IConfig.from_dict(load_json(ckpt / CONFIG_FILE)), ckpt


def _is_pretrained(folder: Path) -> bool:
    saved = load_json(folder / CONFIG_FILE)
    return isinstance(saved, dict) and saved.get("format") == PRETRAINED_FORMAT
