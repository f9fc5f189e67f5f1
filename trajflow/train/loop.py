"""The pieces of one :meth:`~trajflow.train.Trainer.fit` call: the model as one module with its objective,
the state the loop carries from step to step, and the learning curve of ``evaluate`` points."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import accepts_keyword
from ..ema import EMA
from ..schedules import CosineWarmup
from .config import Objective, TrainerConfig, TrainResult
from .interval_log import IntervalLog

__all__ = ["ObjectiveModule", "LearningCurve", "FitState", "progress_bar"]

Evaluate = Callable[[nn.Module, dict[str, float]], Mapping[str, float] | None]


class ObjectiveModule(nn.Module):
    """The model and its objective as one module, so that DDP/FSDP see the whole loss as ``forward``.

    DDP prepares its gradient reduction in ``forward`` and FSDP gathers shards there; NTM's losses call
    ``model.distribution``, ``model.transporter`` and so on, never ``model.forward``, so the wrapper's
    ``forward`` is what those wrappers must see. The objective is kept out of the module tree (it may hold
    frozen networks, e.g. a VAE, that must not be trained, synchronised or saved).
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.__dict__["objective"] = objective
        self.takes_progress = accepts_keyword(objective, "progress")  # read once, not on every step

    def forward(
        self, batch: Any, generator: torch.Generator, step: int, progress: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        extra = {"progress": progress} if self.takes_progress else {}
        out = self.objective(self.model, batch, generator, step, **extra)
        loss, logs = (out, {}) if isinstance(out, Tensor) else (out[0], dict(out[1]))
        return loss, logs


class LearningCurve:
    """The ``evaluate`` points of a run: one each time the run passes another ``1 / points`` of its length.

    Arguments:
        evaluate: ``evaluate(model, point)`` (see :meth:`~trajflow.train.Trainer.fit`), or ``None``: no curve.
        points: How many evaluations after the start.
        progress: The share of the run done when this session starts (points already passed are not repeated).
    """

    def __init__(self, evaluate: Evaluate | None, points: int, progress: float) -> None:
        self.evaluate, self.points = evaluate, points
        self.evaluations: list[dict[str, float]] = []
        self.next_point = self._next(progress)

    def _next(self, progress: float) -> int:
        """The next ``1 / points`` mark after ``progress`` (1-based)."""
        return math.floor(progress * self.points + 1e-9) + 1

    def due(self, progress: float, final: bool) -> bool:
        """Whether to evaluate now: another mark has passed, or this is the run's last step."""
        return self.evaluate is not None and (progress * self.points >= self.next_point - 1e-9 or final)

    def record(self, model: nn.Module, ema: EMA | None, step: int, train_seconds: float, progress: float) -> None:
        """Evaluate ``model`` (with the EMA weights, in eval mode) and append the point."""
        point = {"step": float(step), "train_seconds": train_seconds, "progress": progress}
        with ema.average_parameters(model) if ema is not None else nullcontext(model):
            model.eval()
            point.update(self.evaluate(model, dict(point)) or {})
            model.train()
        self.evaluations.append(point)
        self.next_point = self._next(progress)


def progress_bar(cfg: TrainerConfig, step: int, train_seconds: float, show: bool) -> tqdm:
    """Progress in steps, or in seconds of the budget when the run is timed (its step cap is never reached)."""
    return tqdm(
        total=cfg.time_budget or cfg.max_steps,
        initial=min(train_seconds, cfg.time_budget) if cfg.time_budget else step,
        disable=not show,
        desc="train",
        unit="s" if cfg.time_budget else "it",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]" if cfg.time_budget else None,
        dynamic_ncols=True,
    )


@dataclass
class FitState:
    """What one :meth:`~trajflow.train.Trainer.fit` call carries from step to step.

    ``position`` is the data position (``epoch``, ``batch_in_epoch``; the batches iterator advances it) and,
    once a checkpoint is written, its ``train_seconds`` and ``loss``: the fields of ``trainer.json``.
    """

    wrapped: nn.Module  # the ObjectiveModule as accelerate prepared it
    inner: nn.Module  # the model itself, unwrapped
    optimizer: Any
    scheduler: Any
    ema: EMA | None
    generator: torch.Generator  # the objective's noise, one stream per process
    batches: Iterator[Any]
    position: dict[str, Any]
    log: IntervalLog
    bar: tqdm
    curve: LearningCurve
    run_config: dict[str, Any]
    step: int  # optimizer steps taken
    end: int  # the step the run stops after (moved forward when the time budget is spent)
    train_time: float  # seconds of optimizer steps, carried across resumptions
    timed_lr: CosineWarmup | None  # the schedule over the share of a time budget, or None
    last_save: float  # the wall clock at the last checkpoint
    resumed_from: Path | None = None
    last_ckpt: Path | None = None
    start: int = field(init=False)
    resumed_time: float = field(init=False)

    def __post_init__(self) -> None:
        self.start, self.resumed_time = self.step, self.train_time
        self.last_ckpt = self.resumed_from
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]

    def result(self) -> TrainResult:
        elapsed = max(self.train_time - self.resumed_time, 1e-9)
        return TrainResult(
            step=self.step,
            epoch=self.position["epoch"],
            loss=self.log.last_loss,
            images_per_s=self.log.global_batch * max(self.step - self.start, 0) / elapsed,
            train_seconds=self.train_time,
            checkpoint=self.last_ckpt,
            history=self.log.history,
            ema=self.ema,
            evaluations=self.curve.evaluations,
            resumed_from=self.resumed_from,
            start_step=self.start,
        )
