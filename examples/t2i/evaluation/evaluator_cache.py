"""Evaluation networks trained once with :class:`~trajflow.train.Trainer` and cached in its checkpoint format.

The shapes reader (:mod:`~examples.t2i.evaluation.compositional`) and the text-image features
(:mod:`~examples.t2i.evaluation.features`) are small networks trained on the data they evaluate. Both train through
the one training loop, and a trained network is cached as that loop's output folder, keyed by a digest of
everything that defines it (the data, the network's config and :data:`CACHE_VERSION`)::

    CACHE/<prefix>-<digest>/
        config.json, log.jsonl        the Trainer's run config and log
        checkpoints/step-N/           config.json + model.safetensors (+ optimizer state ...), atomic
        report.json                   the network's held-out report, written last

Training checkpoints every tenth of its steps (and every ``checkpoint_minutes`` of the Trainer's default), so an
entry without ``report.json`` (training was interrupted) continues from its newest intact checkpoint, exactly as
any resumed training run does, to the same weights as an uninterrupted one; a finished one only writes its
report. Loading
compares the checkpoint's ``config.json`` with the key (:func:`~trajflow.checkpoint.check_config`), so a folder
that holds another config's network is refused with a ``ValueError`` naming the differing fields.

Training leaves the caller's state alone: the global random generators are restored afterwards, and so is
accelerate's process-wide state, so that a later :class:`~trajflow.train.Trainer` in the same process may use
another device or mixed precision than the evaluator did.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from trajflow.checkpoint import CONFIG_FILE, load_json, load_model_weights, resolve_checkpoint, save_json
from trajflow.train import Objective, Trainer, TrainerConfig, TrainResult, capture_rng_state, restore_rng_state

__all__ = [
    "CACHE_VERSION",
    "REPORT_FILE",
    "entry_dir",
    "evaluator_trainer_config",
    "noise_augment",
    "fit_evaluator",
    "cached_config",
    "load_evaluator",
    "save_report",
]

#: Part of every cache key: raise it when what a config trains changes (objective, optimiser settings), so
#: that networks trained by older code are not taken for current ones.
CACHE_VERSION = 2
REPORT_FILE = "report.json"
#: The trainer's settings are derived from the evaluator's config (and the data size), which the key holds.
_DERIVED = ("train.",)


def entry_dir(cache_dir: str | Path, prefix: str, key: Mapping[str, Any]) -> Path:
    """The cache folder of ``key``: ``cache_dir / f"{prefix}-{sha1(key)[:12]}"``.

    Example:
        >>> entry_dir("cache", "net", {"width": 8}).name
        'net-80ddefedc829'
    """
    text = json.dumps(key, sort_keys=True, default=str)
    return Path(cache_dir) / f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


@contextmanager
def _caller_state_kept() -> Iterator[None]:
    """Restore the global random generators and accelerate's shared state on exit.

    :class:`Trainer` seeds the global generators and builds an ``Accelerator``, whose state is process-wide
    and refuses a later change of device or mixed precision; an evaluator trained in the middle of a script
    must not leave either behind. accelerate keeps that state in three class-level dicts (a "borg" pattern),
    saved and cleared here. A distributed process group is kept: only the single-process state is private.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    rng = capture_rng_state()
    states = [AcceleratorState, GradientState]
    if PartialState._shared_state.get("num_processes", 1) == 1:
        states.append(PartialState)
    saved = {cls: dict(cls._shared_state) for cls in states}
    for cls in states:
        cls._shared_state.clear()
    try:
        yield
    finally:
        for cls, state in saved.items():
            cls._shared_state.clear()
            cls._shared_state.update(state)
        restore_rng_state(rng)


def evaluator_trainer_config(
    max_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    progress: bool = False,
    device: torch.device,
) -> TrainerConfig:
    """The :class:`TrainerConfig` of an evaluation network: AdamW without clipping or EMA, a cosine decay to zero
    after ``warmup_steps``, and a checkpoint every tenth of the steps (and every 10 minutes), the newest two kept,
    so that an interrupted training resumes (see :func:`fit_evaluator`)."""
    return TrainerConfig(
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        min_lr_ratio=0.0,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        grad_clip=0.0,
        ema_decay=0.0,
        seed=seed,
        log_every=min(50, max_steps),
        checkpoint_every=max(1, max_steps // 10),
        keep_checkpoints=2,
        progress=progress,
        cpu=device.type == "cpu",
    )


def noise_augment(x: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """Images ``x (B, C, H, W)`` plus Gaussian noise of a scale drawn per image uniformly in ``[0, noise)``: what an
    evaluator trains on, so that it reads the slightly noisy images of a generator as it reads clean ones."""
    sigma = noise * torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device)
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device)


def fit_evaluator(
    build: Callable[[], nn.Module],
    objective: Objective,
    dataset: Dataset,
    config: TrainerConfig,
    run_config: Mapping[str, Any],
    *,
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, TrainResult]:
    """Build a network with ``build()`` and train it with :class:`Trainer`; returns it in eval mode on ``device``.

    ``build`` is called after the trainer has seeded the global generators from ``config.seed``, so the
    initialisation is a function of the seed. ``out_dir=None`` trains in a temporary folder (nothing kept). In an
    ``out_dir`` that holds an interrupted training of the same ``run_config``, training continues from its newest
    intact checkpoint (bit-exact on the CPU); one of another config is refused with a ``ValueError`` naming the
    differing fields.
    """
    device = torch.device(device)
    with _caller_state_kept():
        with tempfile.TemporaryDirectory() if out_dir is None else nullcontext(out_dir) as folder:
            trainer = Trainer(config, folder)
            model = build()
            result = trainer.fit(model, objective, dataset, run_config=run_config, resume=out_dir is not None)
    return model.to(device).eval(), result


def cached_config(folder: Path) -> dict[str, Any] | None:
    """The run config of a complete cache entry (its checkpoint's ``config.json``), or ``None`` if there is none."""
    if not (folder / REPORT_FILE).is_file():
        return None
    try:
        checkpoint = resolve_checkpoint(folder)
    except FileNotFoundError:
        return None
    return load_json(checkpoint / CONFIG_FILE)


def load_evaluator(
    folder: Path, model: nn.Module, key: Mapping[str, Any], device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a complete cache entry's weights into ``model`` after checking its config against ``key``.

    Returns the entry's report. Raises ``ValueError`` naming every differing field when the entry was trained
    for another key.
    """
    load_model_weights(resolve_checkpoint(folder), model, expected_config=key, ignore=_DERIVED)
    model.to(device).eval()
    return load_json(folder / REPORT_FILE)


def save_report(folder: Path, report: Mapping[str, Any]) -> None:
    """Write ``report.json`` (atomically), which marks the entry complete."""
    save_json(folder / REPORT_FILE, dict(report))
