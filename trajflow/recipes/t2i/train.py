"""Training a text-to-image run: :func:`train_t2i` builds the data, the encoder, the model and the objective a
:class:`~trajflow.recipes.t2i.config.T2IConfig` names and hands them to the :class:`~trajflow.train.Trainer`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from ...baselines.single_flow import count_parameters
from ...train import Trainer, TrainResult
from .build import build_dataset, build_model
from .bundle import load_t2i
from .config import T2IConfig
from .init_from_fm import init_ntm_from_fm
from .objective import TextToImageObjective
from .sample import save_image_grid
from .text import build_text_encoder
from .vae import VAE, data_shape

__all__ = ["train_t2i"]


def train_t2i(
    config: T2IConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike = False,
    stop_at: int | None = None,
    encoder: Any = None,
) -> TrainResult:
    """Train a text-to-image model as ``config`` says, in ``out_dir``; writes a sample grid at the end.

    Arguments:
        config: The run.
        out_dir: Output folder (``checkpoints/``, ``config.json``, ``log.jsonl``, ``samples/``).
        resume: See :meth:`Trainer.fit`; without it, an ``out_dir`` that already holds a run is refused
            (``FileExistsError``) before anything is built or written.
        stop_at: Stop (and checkpoint) after this step; the schedule still ends at ``train.steps``.
        encoder: A text encoder to reuse (tests share one); by default built from ``config.text``.
    """
    from ...data.text_image import collate_text_image

    trainer = Trainer(config.train, out_dir)
    trainer.check_out_dir(resume)  # before the encoder, the data and the captions: a refusal costs nothing
    encoder = encoder if encoder is not None else build_text_encoder(config.text, trainer.device)
    vae = VAE(config.vae, trainer.device, config.vae_scale) if config.vae else None
    shape = data_shape(config, vae)
    dataset = build_dataset(config.data)
    if config.model.kind == "ntm-fm":
        # The reference lives in the objective only: outside the trained module, its optimizer, EMA and checkpoints.
        model, reference = init_ntm_from_fm(config, encoder, shape, vae=vae, device=trainer.device)
        objective = TextToImageObjective(config, encoder, shape, vae, reference=reference)
    else:
        model = build_model(config, encoder.feature_dim, shape)
        objective = TextToImageObjective(config, encoder, shape, vae)
    n_caps = objective.prepare(dataset, progress=trainer.is_main and config.train.progress)
    n_params = count_parameters(model)
    trainer.print(
        f"t2i: {config.model.kind} with {n_params / 1e6:.2f}M parameters on {shape}; data {dataset!r}"
        + (f"; {n_caps} captions encoded" if n_caps else "")
        + f"; {trainer.world_size} process(es) on {trainer.device} ({trainer.accelerator.distributed_type.value})"
    )
    result = trainer.fit(
        model,
        objective,
        dataset,
        run_config=config.to_dict(),
        collate_fn=collate_text_image,
        resume=resume,
        stop_at=stop_at,
    )
    k = config.sample.grid_prompts
    if k > 0 and trainer.is_main and result.checkpoint is not None and not isinstance(dataset, IterableDataset):
        bundle = load_t2i(result.checkpoint, device=trainer.device, encoder=encoder, vae=vae)
        captions = [dataset[i]["caption"] for i in range(min(k, len(dataset)))]
        images = bundle.generate(captions, seed=config.train.seed)
        path = save_image_grid(images, Path(out_dir) / "samples" / f"{result.checkpoint.name}.png")
        (path.with_suffix(".txt")).write_text("\n".join(captions) + "\n")
        trainer.print(f"samples: {path}")
    trainer.accelerator.wait_for_everyone()
    return result
