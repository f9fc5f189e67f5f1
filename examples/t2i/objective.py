"""The training objective of the recipe: caption -> frozen text features -> loss on the image
(:class:`TextToImageObjective`, an :class:`~trajflow.train.Objective` of the :class:`~trajflow.train.Trainer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from examples.t2i.config import T2IConfig
from examples.t2i.data import dataset_captions
from examples.t2i.text import HashingTextEncoder
from examples.t2i.vae import VAE
from trajflow.baselines.flow_matching import FlowMatchingLoss
from trajflow.finetune import FinetuneLoss, MeanAlignmentLoss
from trajflow.losses import TrajectoryNLL

__all__ = ["TextToImageObjective"]


class TextToImageObjective:
    """The training objective of a text-to-image model: caption -> frozen text features -> loss on the image.

    NTM: :class:`~trajflow.TrajectoryNLL` (exact trajectory NLL, nats/dim). Flow matching:
    :class:`~trajflow.baselines.flow_matching.FlowMatchingLoss`. NTM initialised from flow matching (``"ntm-fm"``):
    :class:`~trajflow.finetune.FinetuneLoss`, the NLL plus lambda times the mean alignment against
    ``reference`` (logged as ``nll``, ``aux``, ``lambda``). All drop 10% of captions (``model.cond_drop``)
    for classifier-free guidance. The text encoder and the VAE run without autocast (frozen, float32).

    lambda decays over ``model.aux_decay_steps`` optimizer steps when that is set, else over the whole run by
    the progress the :class:`~trajflow.train.Trainer` hands in (the share of ``train.max_steps`` or of
    ``train.time_budget`` done: a time-budgeted run, whose ``train.max_steps`` is only a cap, decays over its
    budget). Both are restored on resume, so a resumed run uses the same lambda as an uninterrupted one.

    Arguments:
        config: The run's config.
        encoder: A text encoder (``encode(captions) -> (features, mask)``).
        data_shape: ``(C, H, W)`` the model sees.
        vae: Encode images to latents first.
        reference: ``"ntm-fm"`` only: the frozen velocity model of
            :func:`~examples.t2i.model.init_ntm_from_fm` (it stays here, outside the trained
            module: no optimizer, EMA or checkpoint sees it).
    """

    def __init__(
        self,
        config: T2IConfig,
        encoder: Any,
        data_shape: tuple[int, int, int],
        vae: VAE | None = None,
        *,
        reference: nn.Module | None = None,
    ):
        m = config.model
        self.encoder, self.vae, self.cache = encoder, vae, config.text.cache
        self._seen: set[str] = set()
        if m.kind in ("ntm", "ntm-fm"):
            nll = TrajectoryNLL(
                steps=m.steps if isinstance(m.steps, int) else tuple(m.steps),
                t_min=m.t_min,
                shift=config.shift_for(data_shape),
                mode=m.mode,
                cond_drop=m.cond_drop,
                factor_weights=m.factor_weights,
                validate_args=m.validate_args,  # off: the loss path makes no host-device synchronisation
            )
            self.loss: Any = nll
            self.loss_name = "nll_per_dim"
            if m.kind == "ntm-fm":
                if reference is None:
                    raise ValueError(
                        "reference: model.kind 'ntm-fm' needs the frozen velocity model (init_ntm_from_fm)"
                    )
                self.loss = FinetuneLoss(
                    nll,
                    MeanAlignmentLoss(reference),
                    aux_weight=m.aux_weight,
                    decay_steps=m.aux_decay_steps,
                    decay_fraction=None if m.aux_decay_steps else 1.0,  # the whole run, steps or time budget
                )
                self.loss_name = "finetune_loss"
        else:
            self.loss = FlowMatchingLoss(cond_drop=m.cond_drop)
            self.loss_name = "fm_mse"

    def prepare(self, dataset: Dataset, *, progress: bool = False, chunk: int = 256) -> int:
        """With ``text.cache == "dataset"``, encode every distinct caption of ``dataset`` now.

        Captions go through the encoder in fixed chunks of first-appearance order, so each caption's cached
        features are the same whatever order training later visits them in (and after a resume). Returns
        how many captions were encoded (0 when the dataset cannot list its captions: then lazy caching).
        """
        if self.cache != "dataset" or isinstance(self.encoder, HashingTextEncoder):
            return 0
        captions = dataset_captions(dataset)
        if captions is None:
            self.cache = "lazy"
            return 0
        unique = list(dict.fromkeys(captions))
        for i in tqdm(range(0, len(unique), chunk), desc="encode captions", disable=not progress, dynamic_ncols=True):
            self.encoder.encode(unique[i : i + chunk])
        self._seen.update(unique)
        return len(unique)

    def condition(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(features (B, L, D), mask (B, L))`` on ``device``, in float32."""
        with torch.autocast(device_type=device.type, enabled=False):
            if self.cache == "lazy" and not isinstance(self.encoder, HashingTextEncoder):
                # Each new caption alone: its features then never depend on which captions shared its batch.
                for c in dict.fromkeys(captions):
                    if c not in self._seen:
                        self.encoder.encode([c])
                        self._seen.add(c)
            feats, mask = self.encoder.encode(list(captions))
        return feats.to(device, torch.float32), mask.to(device)

    def images_to_data(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images in [-1, 1] -> what the model sees: the images, or their VAE latents."""
        if self.vae is None:
            return images
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.vae.encode(images)

    def __call__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        step: int,
        *,
        progress: float | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch ``{"image": (B, 3, H, W), "caption": [B strings]}`` (with its parts for
        ``"ntm-fm"``, whose lambda follows ``step`` or ``progress``: see :class:`~trajflow.train.Objective`)."""
        x0 = self.images_to_data(batch["image"])  # (B, C, H, W)
        cond = self.condition(batch["caption"], x0.device)
        if self.loss_name == "finetune_loss":
            return self.loss(model, (x0, cond), generator, step, progress=progress)
        return self.loss(model, x0, cond, generator=generator)
