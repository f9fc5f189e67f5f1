"""What :class:`~trajflow.train.Trainer` is told (:class:`TrainerConfig`), what it optimises (:class:`Objective`)
and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..ema import EMA

__all__ = ["TrainerConfig", "Objective", "TrainResult", "RESUME_IGNORED_FIELDS"]

#: The trainer's config fields that may change between a checkpoint and its resumption (how often things are
#: logged or saved and where, never what is computed); ``Trainer.fit(resume_ignore=...)`` names a run's own.
RESUME_IGNORED_FIELDS: tuple[str, ...] = (
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.keep_checkpoints",
    "train.num_workers",
    "train.tensorboard",
    "train.progress",
)

_MIXED_PRECISION = ("no", "bf16")


@dataclass
class TrainerConfig:
    """Hyper-parameters of :class:`Trainer`.

    Attributes:
        max_steps: Optimizer steps in the whole run (the cosine schedule ends there); with ``time_budget``, the
            most steps the run may take and the scale of ``warmup_steps``. (``steps`` before 0.3.0.)
        batch_size: Examples per process per micro-batch; the global batch is
            ``batch_size * grad_accum * num_processes``.
        grad_accum: Micro-batches accumulated per optimizer step.
        lr: Peak learning rate (NTM from scratch: 1e-4).
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (NTM: 1e-6 / 1e-4).
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW's decoupled weight decay (NTM: 1e-4), on matrices only.
        betas: AdamW's betas (NTM: (0.9, 0.95)).
        grad_clip: Global gradient-norm clip (0: off).
        ema_decay: EMA decay (0: no EMA).
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast; log-dets and losses stay float32).
        seed: Seeds model initialisation, data order and the objective's generator.
        log_every: Steps between log lines (loss averaged over the interval and over processes).
        checkpoint_every: Steps between checkpoints (the last step is always saved).
        checkpoint_minutes: Minutes of wall-clock time after which a checkpoint is written even if
            ``checkpoint_every`` steps have not passed (``None``: steps only), so that a killed run loses at most
            that much work. Checked every step on one process, every ``log_every`` steps on several.
        keep_checkpoints: How many checkpoints to keep.
        num_workers: DataLoader worker processes per training process.
        shuffle: Shuffle the data each epoch.
        tensorboard: Also write TensorBoard scalars (needs the ``tensorboard`` package).
        progress: Show a tqdm progress bar (main process only).
        cpu: Train on the CPU even where a GPU is visible.
        find_unused_parameters: DDP's flag, for models that leave some parameters out of some steps.
        time_budget: Train for this many seconds of optimizer steps (``TrainResult.train_seconds``; not
            checkpoints or start-up) instead of a number of steps: the cosine schedule follows the elapsed share
            of the budget (warmup over ``warmup_steps / max_steps`` of it) and the run stops at the first step
            past it (or at ``max_steps``), with a checkpoint. Not bit-reproducible; a resumed run continues from
            the seconds in its checkpoint. Objectives read the same share as ``progress`` (:meth:`run_progress`).
        lr_scales: Learning-rate multipliers by parameter-name prefix, e.g. ``{"transporter.": 10.0}`` (the
            longest matching prefix wins; others get 1); the schedule scales every group alike.
    """

    max_steps: int = 10_000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 10.0
    keep_checkpoints: int = 3
    num_workers: int = 0
    shuffle: bool = True
    tensorboard: bool = False
    progress: bool = True
    cpu: bool = False
    find_unused_parameters: bool = False
    time_budget: float | None = None
    lr_scales: dict[str, float] = field(default_factory=dict)

    #: Keys of configs before 0.3.0, refused with their new names (:func:`~trajflow.checkpoint.check_renamed_fields`).
    renamed_fields: ClassVar[dict[str, str]] = {"steps": "max_steps"}

    def __post_init__(self) -> None:
        _check_lr_scales(self.lr_scales)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for name, ok, expected in _FIELD_CHECKS:  # in this order: warmup_steps is checked against a valid max_steps
            value = getattr(self, name)
            if not ok(value, self):
                raise ValueError(f"train.{name}: expected {expected.format(max_steps=self.max_steps)}, got {value!r}")

    def run_progress(self, step: int, train_seconds: float) -> float:
        """How much of the run is done after ``step`` optimizer steps and ``train_seconds`` of training, in [0, 1].

        ``max(step / max_steps, train_seconds / time_budget)`` (the second term only with a ``time_budget``),
        capped at 1: what objectives that take ``progress`` get, and what a timed schedule follows.

        Example:
            >>> timed = TrainerConfig(max_steps=1_000_000, warmup_steps=0, time_budget=60.0)
            >>> timed.run_progress(step=10, train_seconds=15.0)
            0.25
            >>> TrainerConfig(max_steps=100, warmup_steps=0).run_progress(step=25, train_seconds=1e9)
            0.25
        """
        done = step / self.max_steps
        if self.time_budget is not None:
            done = max(done, train_seconds / self.time_budget)
        return min(max(done, 0.0), 1.0)


def _check_lr_scales(lr_scales: Mapping[str, float]) -> None:
    for prefix, scale in dict(lr_scales).items():
        if not isinstance(prefix, str) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"train.lr_scales: expected a mapping of parameter-name prefixes to positive numbers, got "
                f"{prefix!r}: {scale!r}"
            )


def _positive_int(v: Any, cfg: TrainerConfig) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_or_none(v: Any, cfg: TrainerConfig) -> bool:
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return v is None or (numeric and math.isfinite(v) and v > 0)


def _betas(v: Any, cfg: TrainerConfig) -> bool:
    return len(v) == 2 and all(0.0 <= b < 1.0 for b in v)


_COUNTS = ("max_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints")

# (field, check(value, config), what is expected) for every field but lr_scales, checked in order by
# TrainerConfig.__post_init__; a failed check raises "train.<field>: expected <what>, got <value>".
_FIELD_CHECKS: tuple[tuple[str, Callable[[Any, TrainerConfig], bool], str], ...] = (
    *((name, _positive_int, "a positive integer") for name in _COUNTS),
    (
        "warmup_steps",
        lambda v, cfg: isinstance(v, int) and 0 <= v <= cfg.max_steps,
        "an integer in 0..max_steps={max_steps}",
    ),
    ("lr", lambda v, cfg: v > 0, "a positive learning rate"),
    ("time_budget", _positive_or_none, "a positive number of seconds or null"),
    ("min_lr_ratio", lambda v, cfg: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    ("betas", _betas, "two numbers in [0, 1)"),
    ("weight_decay", lambda v, cfg: not v < 0, "a non-negative number"),
    ("grad_clip", lambda v, cfg: not v < 0, "a non-negative number"),
    ("ema_decay", lambda v, cfg: 0.0 <= v < 1.0, "a number in [0, 1) (0 disables)"),
    (
        "mixed_precision",
        lambda v, cfg: v in _MIXED_PRECISION,
        f"one of {_MIXED_PRECISION} (fp16 would need loss scaling and is not supported)",
    ),
    ("checkpoint_minutes", _positive_or_none, "a positive number of minutes or null"),
    ("num_workers", lambda v, cfg: isinstance(v, int) and v >= 0, "a non-negative integer"),
)


class Objective(Protocol):
    """What :class:`Trainer` optimises: ``objective(model, batch, generator, step)``, or
    ``objective(model, batch, generator, step, progress=...)`` when it takes a ``progress`` keyword.

    Returns a scalar float32 loss, or ``(loss, logs)`` with extra scalars to log. ``batch`` is what the
    DataLoader yields, on the device; ``generator`` is the process's ``torch.Generator`` there, for every
    random draw (it is saved in checkpoints); ``step`` is the optimizer step being computed (0 first; the same
    for every micro-batch of a step).

    ``progress`` goes only to objectives whose signature has a ``progress`` parameter (or ``**kwargs``): the
    share of the run done before this step, :meth:`TrainerConfig.run_progress` in [0, 1], so that a schedule
    decays over the run whether it is counted in steps or in seconds (under a time budget each process
    measures its own seconds). :class:`~trajflow.finetune.FinetuneLoss` and
    :class:`~trajflow.likelihood.DequantizedObjective` take it. An optional attribute ``loss_name`` (e.g.
    ``"nll_per_dim"``) names the loss in logs.
    """

    def __call__(
        self, model: nn.Module, batch: Any, generator: torch.Generator, step: int
    ) -> Tensor | tuple[Tensor, Mapping[str, Tensor]]: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every process).

    The trained model holds the **raw** weights of the last step, not their EMA: ``result.ema.copy_to(model)``
    (or ``with result.ema.average_parameters(model):``) puts the averages in, as does
    :func:`trajflow.checkpoint.load_model_weights` ``(..., ema=True)`` from a checkpoint.
    """

    step: int
    epoch: int
    loss: float  # the last logged loss, averaged over processes
    images_per_s: float  # global examples per second of training (checkpointing excluded)
    train_seconds: float
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    ema: EMA | None = None
    """The EMA of the model's trainable parameters at the end of the run (``None`` when ``ema_decay = 0``);
    it is what the last checkpoint's ``ema.safetensors`` holds."""
    evaluations: list[dict[str, float]] = field(default_factory=list)  # the ``evaluate`` points of ``fit``
    resumed_from: Path | None = None
    """The checkpoint this session started from (``None``: step 0); with ``resume=True`` the newest intact one."""
    start_step: int = 0
    """The step this session started from (that checkpoint's step, or 0)."""
