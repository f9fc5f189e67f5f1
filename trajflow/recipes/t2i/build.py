"""What a :class:`~trajflow.recipes.t2i.config.T2IConfig` builds: the dataset (:func:`build_dataset`, with
:func:`dataset_captions` for the text cache) and the untrained network (:func:`build_transporter`,
:func:`build_model`)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .config import DataConfig, T2IConfig

__all__ = ["build_dataset", "dataset_captions", "build_transporter", "build_model"]


def build_dataset(config: DataConfig, *, seed: int | None = None, length: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names; ``seed``/``length`` override the shapes generator's
    (evaluation draws held-out scenes this way)."""
    from ...data import text_image as ti

    res = config.resolution
    if config.name == "shapes":
        kwargs: dict[str, Any] = {}
        for name in ("shapes", "colours", "sizes", "backgrounds"):
            if getattr(config, name) is not None:
                kwargs[name] = tuple(getattr(config, name))
        return ti.ShapesDataset(
            length=config.length if length is None else length,
            resolution=res,
            seed=config.seed if seed is None else seed,
            grid=config.grid,
            max_objects=config.max_objects,
            max_groups=config.max_groups,
            **kwargs,
        )
    if config.name == "emoji":
        return ti.EmojiDataset(resolution=res, skin_tones=config.emoji_skin_tones, limit=config.emoji_limit)
    transform = ti.ImageTransform(res, crop=config.crop, hflip=config.hflip)
    if config.name == "caption_folder":
        return ti.CaptionFolder(config.path, transform)
    if config.name == "metadata_folder":
        return ti.MetadataImageFolder(config.path, transform, caption_column=config.caption_column)
    return ti.TarShards(config.path, transform, shuffle=True, shuffle_buffer=config.shuffle_buffer, seed=config.seed)


def dataset_captions(dataset: Dataset) -> list[str] | None:
    """Every caption of a map-style dataset, read cheaply where the dataset allows it (no image decoding);
    ``None`` for streams and datasets that can only give captions with their images."""
    from ...data import text_image as ti

    if isinstance(dataset, ti.ShapesDataset):
        return [dataset.caption(dataset.scene(i)) for i in range(len(dataset))]
    if isinstance(dataset, ti.EmojiDataset):
        return list(dataset.captions)
    return None


def build_transporter(
    config: T2IConfig, data_shape: tuple[int, int, int], text_features: int | None = None
) -> nn.Module:
    """NTM's transporter: the TarFlow-style :class:`~trajflow.transporters.TransformerTransporter`, or the
    identity for ``model.transporter == "identity"`` (the Gaussian-step model of NTM App. A.2).
    ``text_features``: the caption features' width, for ``model.transporter_condition``."""
    from ...transporters import IdentityTransporter
    from ...transporters.transformer import TransformerTransporter

    if config.model.transporter == "identity":
        return IdentityTransporter(tuple(data_shape))
    return TransformerTransporter(config.transporter_config(data_shape, text_features))


def build_model(config: T2IConfig, text_features: int, data_shape: tuple[int, int, int]) -> nn.Module:
    """An :class:`~trajflow.NTM` (transformer transporter + text-conditioned transformer predictor) or, for
    ``model.kind == "fm"``, a :class:`~trajflow.predictors.transformer.TransformerVelocity` of the same
    width and depth as that predictor.

    ``model.kind == "ntm-fm"`` gives the architecture of an NTM initialised from flow matching (transformer
    transporter + :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around a
    ``TransformerVelocity``) with fresh weights, for loading checkpoints;
    :func:`~trajflow.recipes.t2i.init_from_fm.init_ntm_from_fm` builds it from the flow-matching run for
    training.

    Example:
        >>> cfg = T2IConfig.from_dict({"data": {"resolution": 16}, "model": {"patch_size": 4, "width": 32,
        ...     "depth": 1, "heads": 2, "time_features": 16, "transporter_layers": 1}})
        >>> type(build_model(cfg, 8, (3, 16, 16))).__name__
        'NTM'
    """
    from ...model import NTM
    from ...predictors.from_velocity import FlowMatchingPredictor
    from ...predictors.transformer import TransformerPredictor, TransformerVelocity

    pc = config.predictor_config(text_features, data_shape)
    if config.model.kind == "fm":
        return TransformerVelocity(pc)
    transporter = build_transporter(config, data_shape, text_features)
    if config.model.kind == "ntm-fm" or config.model.predictor == "posterior":
        return NTM(transporter, FlowMatchingPredictor(TransformerVelocity(pc), c_min=config.model.c_min))
    return NTM(transporter, TransformerPredictor(pc))
