"""NTM initialised from a flow-matching run of this recipe (NTM §3.3): :func:`init_ntm_from_fm`, after checking
that the run fits the config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .build import build_transporter
from .bundle import load_t2i, load_t2i_config
from .config import T2IConfig
from .vae import VAE

__all__ = ["init_ntm_from_fm"]


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

    Loads that run with :func:`~trajflow.recipes.t2i.bundle.load_t2i` (EMA weights when it saved them), wraps its
    :class:`~trajflow.predictors.transformer.TransformerVelocity` with
    :func:`~trajflow.finetune.init_from_flow_matching` and an identity-at-init transporter built from
    ``config`` (zero-initialised heads). Every step of the returned NTM is then the flow-matching model's
    Gaussian posterior sampler.

    Returns:
        :class:`~trajflow.finetune.FlowMatchingInit` ``(model, reference)``: the NTM (same architecture as
        :func:`~trajflow.recipes.t2i.build.build_model` gives for this config) and a frozen copy of the
        velocity model, for :class:`~trajflow.finetune.MeanAlignmentLoss`. Keep the reference out of the
        trained module.

    Raises:
        ValueError: ``config.model.kind`` is not ``"ntm-fm"``; the run at ``init_from`` is not a
            flow-matching run; or it differs from ``config`` in a field that shapes the velocity network or
            its inputs (every such field is named, with both values).
    """
    from ...finetune import init_from_flow_matching

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
