"""Training one toy method through :class:`trajflow.train.Trainer`, in its own folder with its own checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ...checkpoint import load_json, load_model_weights
from ...train import Trainer, TrainerConfig
from .config import RESUME_IGNORED, ToyConfig
from .data import ToyTrainingSet, whole_batch
from .methods import ToyObjective, build_model

__all__ = [
    "TrainRecord",
    "trainer_config",
    "train_method",
    "train_ntm",
    "train_gaussian",
    "train_flow_matching",
    "train_nsf",
]

#: With a seconds budget, the Trainer's ``steps`` is only a cap (and the scale of the warmup): the budget ends
#: the run long before.
SECONDS_MAX_STEPS = 10_000_000
#: Steps between log lines (and loss reads, which would synchronise a GPU every step).
LOG_EVERY = 50


@dataclass
class TrainRecord:
    """What training one method did.

    Attributes:
        iters: Optimizer steps done in all.
        seconds: Training seconds of the Trainer's last session (all sessions with a ``seconds`` budget).
        loss: The last logged training loss.
        resumed_from: The step this session started from (0: a fresh run).
        checkpoint: The Trainer's last checkpoint folder (``None`` for a run kept in memory).
        history: The Trainer's log records of this session.
    """

    iters: int
    seconds: float
    loss: float
    resumed_from: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def trainer_config(cfg: ToyConfig) -> TrainerConfig:
    """The :class:`~trajflow.train.TrainerConfig` of every method of ``cfg`` (see :class:`ToyConfig`).

    Example:
        >>> t = trainer_config(ToyConfig(iters=1200))
        >>> t.steps, t.warmup_steps, t.batch_size, t.betas
        (1200, 24, 512, (0.9, 0.99))
    """
    steps = cfg.iters if cfg.iters is not None else SECONDS_MAX_STEPS
    return TrainerConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio,
        warmup_steps=round(cfg.warmup * steps),
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.99),  # the toy models' AdamW betas (the Trainer's default 0.95 is NTM's for images)
        grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        log_every=LOG_EVERY,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_minutes=cfg.checkpoint_minutes,
        keep_checkpoints=2,
        progress=cfg.progress,
        cpu=cfg.device == "cpu",
        time_budget=float(cfg.seconds) if cfg.seconds is not None else None,
    )


def _run_config(method: str, cfg: ToyConfig) -> dict[str, Any]:
    """What defines the training of ``method`` (saved in every checkpoint and compared on resume)."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_IGNORED}
    return {"recipe": "toy", "method": method, "toy": fields}


def train_method(
    method: str,
    cfg: ToyConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    stop_at: int | None = None,
) -> tuple[nn.Module, TrainRecord]:
    """Train one method of ``cfg`` for ``cfg``'s budget with :class:`~trajflow.train.Trainer`.

    The method trains in ``out_dir/<method>/``: the Trainer's ``config.json``, ``log.jsonl`` and
    ``checkpoints/step-NNNNNNN/`` (``config.json`` + ``model.safetensors`` + ``ema.safetensors``, optimizer,
    scheduler and random states, written atomically every ``cfg.checkpoint_every`` steps, every
    ``cfg.checkpoint_minutes`` and at the end).
    Without ``out_dir`` it trains in a temporary folder that is deleted afterwards.

    Arguments:
        method: One of :data:`~trajflow.recipes.toy.METHODS`.
        cfg: The run.
        out_dir: The run's folder.
        resume: Continue from the method's newest checkpoint (bit-exact on the CPU with an ``iters`` budget);
            a finished method is loaded without training. The checkpoint's config must describe the same
            training (a ``ValueError`` names the fields that differ).
        model: Train this model instead of :func:`~trajflow.recipes.toy.build_model`'s.
        stop_at: Stop after this step (checkpointed) without changing the schedule, as an interruption would.

    Returns:
        The trained model with the EMA weights loaded when ``cfg.ema_decay > 0``, in eval mode, and a
        :class:`TrainRecord`.

    Example:
        >>> cfg = ToyConfig(iters=2, batch_size=16, width=8, depth=1, progress=False)
        >>> model, record = train_method("fm", cfg)
        >>> record.iters, model.training
        (2, False)
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"toy-{method}-") as tmp:
            model, record = train_method(method, cfg, tmp, resume=False, model=model, stop_at=stop_at)
            return model, TrainRecord(record.iters, record.seconds, record.loss, 0, None, record.history)

    folder = Path(out_dir) / method
    trainer = Trainer(trainer_config(cfg), folder)
    model = model if model is not None else build_model(method, cfg)
    result = trainer.fit(
        model,
        ToyObjective(method, cfg),
        ToyTrainingSet(cfg),
        run_config=_run_config(method, cfg),
        collate_fn=whole_batch,
        resume=resume,
        stop_at=stop_at,
    )
    checkpoint = result.checkpoint
    assert checkpoint is not None  # the Trainer always saves its last step
    start, resumed_from = result.resumed_from, result.start_step  # the newest intact checkpoint, when resuming
    loss, seconds = result.loss, result.train_seconds
    if result.step == resumed_from and start is not None:
        # A finished run resumed without a step: its loss and seconds are those of the session that finished it.
        loss, seconds = _last_logged_loss(folder), float(load_json(start / "trainer.json").get("train_seconds", 0.0))
    # Evaluate the EMA weights (buffers, if any, come from model.safetensors).
    load_model_weights(checkpoint, model, ema=cfg.ema_decay > 0)
    model.eval()
    return model, TrainRecord(result.step, seconds, loss, resumed_from, checkpoint, result.history)


def _last_logged_loss(folder: Path) -> float:
    """The loss of the last line of the Trainer's ``log.jsonl`` (NaN without one)."""
    path = folder / "log.jsonl"
    if not path.is_file():
        return float("nan")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return float("nan")
    record = json.loads(lines[-1])
    return float(next((v for k, v in record.items() if k in ("nll_per_dim", "fm_loss")), float("nan")))


def train_ntm(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False):
    """Train the NTM (zuko NSF transporter + MLP predictor) of ``cfg``; see :func:`train_method`."""
    return train_method("ntm", cfg, out_dir, resume=resume)


def train_gaussian(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False):
    """Train the Gaussian-step model (NTM with the identity transporter); see :func:`train_method`."""
    return train_method("gaussian", cfg, out_dir, resume=resume)


def train_flow_matching(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False):
    """Train the flow-matching velocity on the same MLP; see :func:`train_method`."""
    return train_method("fm", cfg, out_dir, resume=resume)


def train_nsf(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False):
    """Fit the single zuko NSF by maximum likelihood; see :func:`train_method`."""
    return train_method("nsf", cfg, out_dir, resume=resume)
