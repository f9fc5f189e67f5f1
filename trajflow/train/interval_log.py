"""The training log of :class:`~trajflow.train.Trainer`: one ``log.jsonl`` record (and TensorBoard scalars) per
log interval."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["IntervalLog", "tensorboard_writer"]


def tensorboard_writer(folder: Path, say: Any = print) -> Any:
    """A TensorBoard ``SummaryWriter`` writing into ``folder``, or ``None`` (and a message through ``say``)
    where tensorboard is not installed (an optional dependency, hence imported here)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say("tensorboard: not installed (pip install tensorboard); logging to log.jsonl only")
        return None
    return SummaryWriter(str(folder))


class IntervalLog:
    """Losses and extra scalars summed on the device over a log interval, flushed as one ``log.jsonl`` record.

    Summing on the device and reducing only at a flush keeps the step itself free of host synchronisation.

    Arguments:
        accelerator: The run's ``accelerate.Accelerator`` (device, processes, the reduction at a flush).
        path: The ``log.jsonl`` file, written by the main process.
        loss_name: The key of the loss in the records.
        batch_per_process: Examples per optimizer step on one process.
        writer: A TensorBoard writer for the main process (:func:`tensorboard_writer`), or ``None``.
    """

    def __init__(
        self, accelerator: Any, path: Path, loss_name: str, batch_per_process: int, writer: Any = None
    ) -> None:
        self.accelerator, self.path, self.loss_name, self.writer = accelerator, path, loss_name, writer
        self.is_main = accelerator.is_main_process
        self.global_batch = batch_per_process * accelerator.num_processes  # examples per step, all processes
        self.loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        self.logs: dict[str, Tensor] = {}
        self.steps, self.seconds = 0, 0.0
        self.last_loss = float("nan")  # until the first flush: the checkpoint's, on resume (see Trainer.fit)
        self.history: list[dict[str, float]] = []

    def add(self, loss: Tensor, logs: Mapping[str, Any], grad_accum: int) -> None:
        self.loss += loss.detach().double() / grad_accum
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + torch.as_tensor(v).detach().double() / grad_accum

    def tick(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def flush(self, step: int, epoch: int, lr: float, grad_norm: Tensor | None, last_ckpt: Path | None) -> dict:
        """The interval's record (means over its steps and the processes), appended to the log; then a new
        interval. Raises ``FloatingPointError`` when the loss is not finite."""
        self.last_loss = self._mean(self.loss)
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(
                f"loss: became {self.last_loss} by step {step}; lower train.lr, keep train.grad_clip on, or "
                f"check the data (last checkpoint: {last_ckpt})"
            )
        record = {"step": step, "epoch": epoch, self.loss_name: self.last_loss, "lr": lr}
        record["images_per_s"] = self.global_batch * self.steps / max(self.seconds, 1e-9)
        record.update({"grad_norm": float(grad_norm)} if grad_norm is not None else {})
        record.update({k: self._mean(v) for k, v in self.logs.items()})
        self.history.append(record)
        if self.is_main:
            self._write(record)
        self.loss.zero_()
        self.logs, self.steps, self.seconds = {}, 0, 0.0
        return record

    def _mean(self, total: Tensor) -> float:
        """A sum over the interval's steps as a mean over steps and processes (a collective)."""
        return float(self.accelerator.reduce(total, "mean")) / self.steps

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if self.writer is not None and k != "step":
                self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
