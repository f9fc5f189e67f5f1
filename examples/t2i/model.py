r"""The text-to-image model of the lab: the untrained network a :class:`~examples.t2i.config.T2IConfig`
builds (:func:`build_model`, :func:`build_transporter`), an NTM initialised from a flow-matching run
(:func:`init_ntm_from_fm`, NTM §3.3), and a trained model with everything needed to sample it
(:class:`T2IModel`), read from a training checkpoint (:func:`load_t2i`) or a pretrained folder
(:meth:`T2IModel.from_pretrained`).

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

from examples.t2i.config import T2IConfig
from examples.t2i.sampling import DEFAULT_DENOISE_T_MIN, generate
from examples.t2i.text import build_text_encoder
from examples.t2i.vae import VAE, data_shape
from trajflow.checkpoint import (
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
from trajflow.finetune import init_from_flow_matching
from trajflow.model import NTM
from trajflow.predictors.from_velocity import FlowMatchingPredictor
from trajflow.predictors.transformer import TransformerPredictor
from trajflow.transporters import IdentityTransporter
from trajflow.transporters.transformer import TransformerTransporter
from trajflow.velocity import TransformerVelocity

__all__ = ["build_transporter", "build_model", "init_ntm_from_fm", "T2IModel", "load_t2i", "load_t2i_config"]


# -- the network --------------------------------------------------------------------------------------------
def build_transporter(
    config: T2IConfig, data_shape: tuple[int, int, int], text_features: int | None = None
) -> nn.Module:
    """NTM's transporter: the TarFlow-style :class:`~trajflow.transporters.TransformerTransporter`, or the
    identity for ``model.transporter == "identity"`` (the Gaussian-step model of NTM App. A.2).
    ``text_features``: the caption features' width, for ``model.transporter_condition``."""
    if config.model.transporter == "identity":
        return IdentityTransporter(tuple(data_shape))
    return TransformerTransporter(config.transporter_config(data_shape, text_features))


def build_model(config: T2IConfig, text_features: int, data_shape: tuple[int, int, int]) -> nn.Module:
    """An :class:`~trajflow.NTM` (transformer transporter + text-conditioned transformer predictor) or, for
    ``model.kind == "fm"``, a :class:`~trajflow.velocity.TransformerVelocity` of the same
    width and depth as that predictor.

    ``model.kind == "ntm-fm"`` gives the architecture of an NTM initialised from flow matching (transformer
    transporter + :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around a
    ``TransformerVelocity``) with fresh weights, for loading checkpoints;
    :func:`init_ntm_from_fm` builds it from the flow-matching run for
    training.

    Example:
        >>> cfg = T2IConfig.from_dict({"data": {"resolution": 16}, "model": {"patch_size": 4, "width": 32,
        ...     "depth": 1, "heads": 2, "time_features": 16, "transporter_layers": 1}})
        >>> type(build_model(cfg, 8, (3, 16, 16))).__name__
        'NTM'
    """
    pc = config.predictor_config(text_features, data_shape)
    if config.model.kind == "fm":
        return TransformerVelocity(pc)
    transporter = build_transporter(config, data_shape, text_features)
    if config.model.kind == "ntm-fm" or config.model.predictor == "posterior":
        return NTM(transporter, FlowMatchingPredictor(TransformerVelocity(pc), c_min=config.model.c_min))
    return NTM(transporter, TransformerPredictor(pc))


# -- an NTM initialised from a flow-matching run (NTM §3.3) ---------------------------------------------------
#: Fields of a flow-matching run that must equal those of an ``"ntm-fm"`` config initialised from it (they
#: fix the velocity network's shape, its inputs and the space it models).
_FM_INIT_FIELDS = (
    "data.resolution",
    "vae",
    "model.patch_size",
    "model.width",
    "model.depth",
    "model.heads",
    "model.kv_heads",
    "model.time_features",
    "text.encoder",
    "text.model_path",
    "text.max_length",
    "text.hashing_dim",
)


def _field(d: Mapping[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        d = d[key]
    return d


def init_ntm_from_fm(
    config: T2IConfig,
    encoder: Any,
    data_shape: tuple[int, int, int],
    *,
    vae: VAE | None = None,
    device: str | torch.device = "cpu",
):
    """An ``"ntm-fm"`` model initialised from the flow-matching run ``config.model.init_from`` (NTM §3.3).

    Loads that run with :func:`load_t2i` (EMA weights when it saved them), wraps its
    :class:`~trajflow.velocity.TransformerVelocity` with
    :func:`~trajflow.finetune.init_from_flow_matching` and an identity-at-init transporter built from
    ``config`` (zero-initialised heads). Every step of the returned NTM is then the flow-matching model's
    Gaussian posterior sampler.

    Returns:
        :class:`~trajflow.finetune.FlowMatchingInit` ``(model, reference)``: the NTM (same architecture as
        :func:`build_model` gives for this config) and a frozen copy of the
        velocity model, for :class:`~trajflow.finetune.MeanAlignmentLoss`. Keep the reference out of the
        trained module.

    Raises:
        ValueError: ``config.model.kind`` is not ``"ntm-fm"``; the run at ``init_from`` is not a
            flow-matching run; or it differs from ``config`` in a field that shapes the velocity network or
            its inputs (every such field is named, with both values).
    """
    m = config.model
    if m.kind != "ntm-fm":
        raise ValueError(f"model.kind: init_ntm_from_fm needs 'ntm-fm', got {m.kind!r}")
    fm_config, ckpt = load_t2i_config(m.init_from)  # type: ignore[arg-type]
    if fm_config.model.kind != "fm":
        raise ValueError(
            f"model.init_from: expected a flow-matching run (model.kind 'fm'), but {str(ckpt)!r} holds a "
            f"{fm_config.model.kind!r} model"
        )
    ours, theirs = config.to_dict(), fm_config.to_dict()
    diff = [
        f"{f} (flow-matching run: {_field(theirs, f)!r}, this config: {_field(ours, f)!r})"
        for f in _FM_INIT_FIELDS
        if _field(ours, f) != _field(theirs, f)
    ]
    if diff:
        raise ValueError(
            f"model.init_from: the flow-matching run {str(ckpt)!r} does not match this config; differing "
            "fields: " + "; ".join(diff)
        )
    fm = load_t2i(ckpt, device=device, encoder=encoder, vae=vae)
    if tuple(fm.data_shape) != tuple(data_shape):
        raise ValueError(f"model.init_from: the flow-matching run models {fm.data_shape}, this config {data_shape}")
    velocity = fm.model.train()
    transporter = build_transporter(config, data_shape, velocity.config.text_features).to(device)
    return init_from_flow_matching(velocity, transporter, c_min=m.c_min)


# -- a trained model, ready to sample ---------------------------------------------------------------------------
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
