"""The training loop itself: :class:`Trainer` (see :mod:`trajflow.train` for what one step does)."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointDir,
    load_safetensors,
    save_json,
    save_safetensors,
    save_state,
)
from ..checks import check_count
from ..ema import EMA
from ..schedules import CosineWarmup, cosine_with_warmup
from .config import Objective, TrainerConfig, TrainResult
from .data_order import endless_batches, mix_seed, to_device
from .interval_log import IntervalLog, tensorboard_writer
from .loop import Evaluate, FitState, LearningCurve, ObjectiveModule, progress_bar
from .random_state import capture_rng_state
from .run_folder import LOG_FILE, check_fresh_start, check_resume, checkpoint_to_resume, cut_log, restore_states

__all__ = ["Trainer"]

# The clock of the time budget, behind a module name so that tests can drive a time-budgeted run with a fake one.
_clock = time.perf_counter
# The clock of ``checkpoint_minutes`` (wall-clock time, checkpoints and evaluations included), for tests likewise.
_wall_clock = time.monotonic


def _param_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scales: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Decay matrices (and higher-rank weights), not biases, norm gains or scalars; one pair of groups per
    learning-rate scale (the longest prefix of ``lr_scales`` a parameter's name starts with, else 1). The
    unscaled groups come first, so that the first group's ``lr`` is the schedule's."""
    groups: dict[tuple[float, bool], list[Tensor]] = {}
    prefixes = sorted(lr_scales, key=len, reverse=True)
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((float(lr_scales[k]) for k in prefixes if name.startswith(k)), 1.0)
            groups.setdefault((scale, p.dim() >= 2), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
        for (scale, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1]))
    ]


class Trainer:
    """Trains a model on an objective with accelerate; see the module docstring.

    Arguments:
        config: A :class:`TrainerConfig`.
        out_dir: Where ``config.json``, ``log.jsonl``, ``checkpoints/`` (and ``tb/``) go.
        accelerator: An ``accelerate.Accelerator`` to use instead of building one from ``config``.

    The accelerator (and ``torch.distributed``) is set up here, so build datasets that read the process rank
    afterwards. The global seeds are set here too, from ``config.seed`` on every process (every rank
    initialises the same model).
    """

    def __init__(self, config: TrainerConfig, out_dir: str | Path, *, accelerator: Any = None) -> None:
        try:
            from accelerate import Accelerator, DistributedDataParallelKwargs
        except ImportError as e:  # pragma: no cover - accelerate is a declared dependency of trajflow[t2i]
            raise ImportError("Trainer needs accelerate: pip install accelerate (or 'trajflow[t2i]')") from e
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config: expected a trajflow.train.TrainerConfig, got {type(config).__name__}")
        self.config = config
        self.out_dir = Path(out_dir)
        if accelerator is None:
            kwargs = [DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)]
            # without CUDA, accelerate joins a torchrun job's processes into one (gloo) group only when told cpu
            cpu = config.cpu or not torch.cuda.is_available()
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu, kwargs_handlers=kwargs)
        self.accelerator = accelerator
        self.seed_everything(config.seed)
        self.checkpoints = CheckpointDir(self.out_dir / "checkpoints", keep=config.keep_checkpoints)

    @staticmethod
    def seed_everything(seed: int) -> None:
        """Seed python, numpy and torch (CPU and CUDA)."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def _is_fsdp(self) -> bool:
        return str(self.accelerator.distributed_type).endswith("FSDP")

    def print(self, *args: Any) -> None:
        """Print on the main process only (through tqdm, so that progress bars are not broken)."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    def _save(self, run: FitState) -> Path:
        """Write checkpoint ``run.step`` (every rank calls this: FSDP gathers shards collectively)."""
        acc, step, wrapped, ema = self.accelerator, run.step, run.wrapped, run.ema
        name = CheckpointDir.name(step)
        staging = self.checkpoints.staging(step) if self.is_main else self.checkpoints.root / f".{name}.tmp"
        acc.wait_for_everyone()
        save_state(staging / f"rng-rank{self.rank}.safetensors", capture_rng_state(run.generator))
        model_state = acc.get_state_dict(wrapped)  # full tensors on the main process (FSDP: gathered)
        ema_state = ema.state_dict() if ema is not None else None  # collective under FSDP
        opt_state = self._optimizer_state(run)  # collective under FSDP
        if self.is_main:
            self._write_step_files(staging, run, model_state, ema_state, opt_state)
        acc.wait_for_everyone()
        final = self.checkpoints.commit(staging, step) if self.is_main else self.checkpoints.root / name
        acc.wait_for_everyone()
        return final

    def _optimizer_state(self, run: FitState) -> dict[str, Any] | None:
        """The optimizer's full state on the main process (``None`` elsewhere; gathered under FSDP)."""
        if not self._is_fsdp:
            return run.optimizer.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            run.wrapped, run.optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _write_step_files(
        self,
        staging: Path,
        run: FitState,
        model_state: dict[str, Tensor],
        ema_state: dict[str, Tensor] | None,
        opt_state: dict[str, Any] | None,
    ) -> None:
        """The files of checkpoint ``run.step`` in ``staging`` (main process): weights, EMA, optimizer,
        scheduler, the trainer's position and the run's config."""
        prefix, meta = "model.", {"step": str(run.step)}
        model_state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
        save_safetensors(staging / MODEL_FILE, model_state, meta)
        if ema_state is not None:
            save_safetensors(staging / EMA_FILE, ema_state, {**meta, **run.ema.metadata()})
        save_state(staging / "optimizer.safetensors", opt_state)
        save_state(staging / "scheduler.safetensors", run.scheduler.state_dict())
        info = {**run.position, "step": run.step, "world_size": self.world_size, "threads": torch.get_num_threads()}
        save_json(staging / TRAINER_FILE, info)
        save_json(staging / CONFIG_FILE, dict(run.run_config))

    def check_out_dir(self, resume: bool | str | Path = False) -> None:
        """Raise ``FileExistsError`` (naming ``resume``) when a fresh run (``resume`` false) would start in an
        ``out_dir`` that already holds a run; :meth:`fit` calls it first, recipes may call it before costly
        preparation."""
        check_fresh_start(self.out_dir, self.checkpoints, resume)

    def _checkpoint_due(self, step: int, since: float) -> bool:
        """Whether ``checkpoint_minutes`` have passed since ``since`` (the same answer on every process: with
        several, the main process decides at log steps and the others follow)."""
        minutes = self.config.checkpoint_minutes
        if minutes is None or (self.world_size > 1 and step % self.config.log_every):
            return False
        due = _wall_clock() - since >= 60.0 * minutes
        if self.world_size == 1:
            return due
        from accelerate.utils import broadcast

        return bool(broadcast(torch.tensor([float(due)], device=self.device), from_process=0).item())

    def fit(
        self,
        model: nn.Module,
        objective: Objective,
        dataset: Dataset,
        *,
        run_config: Mapping[str, Any] | None = None,
        resume_ignore: Sequence[str] = (),
        collate_fn: Callable | None = None,
        resume: bool | str | Path = False,
        stop_at: int | None = None,
        evaluate: Evaluate | None = None,
        evaluate_points: int = 10,
    ) -> TrainResult:
        """Train ``model`` for ``config.max_steps`` optimizer steps (or until ``stop_at``, or until the time budget is
        spent), checkpointing as it goes. ``model`` ends with the raw weights of the last step, **not** their EMA
        (``result.ema.copy_to(model)`` puts the averages in; see :class:`TrainResult`).

        Arguments:
            model: The model to train (a plain module; it is wrapped for DDP/FSDP here).
            objective: See :class:`Objective`.
            dataset: A map-style dataset (any order, resumable exactly) or an ``IterableDataset``.
            run_config: Everything that defines the run (model, data, ...); saved as ``config.json`` with the
                trainer's own config under ``"train"``, and compared on resume.
            resume_ignore: Fields of ``run_config`` that may change between a checkpoint and its resumption
                (dotted paths; one ending in ``.`` names a whole section, e.g. ``"sample."``), besides the
                trainer's own :data:`~trajflow.train.RESUME_IGNORED_FIELDS`.
            collate_fn: The DataLoader's collate function.
            resume: ``True``: continue from the newest intact checkpoint in ``out_dir`` (or start afresh if
                there is none); a path: from that step folder, or the newest intact one of that run; ``False``:
                start afresh, which an ``out_dir`` that already holds a run refuses. A damaged checkpoint is
                skipped for the next older one with a warning; ``log.jsonl`` is cut back to the step resumed from.
            stop_at: Stop after this step (checkpointed) without changing the schedule, as an interruption
                would; used by tests of resumption.
            evaluate: Called as ``evaluate(model, point)`` at the start of a fresh run and each time the run
                passes another ``1 / evaluate_points`` of its length (a learning curve, outside training time),
                with the EMA weights (else the raw ones) in eval mode; ``point`` has ``step``, ``train_seconds``
                and ``progress`` in [0, 1], and what it returns is added to it (:attr:`TrainResult.evaluations`).
                Points passed before a resumption are not repeated.
            evaluate_points: How many evaluations after the start (10: every 10% of the run).

        Returns:
            A :class:`TrainResult`: the step reached, the last logged loss, the timings, the last checkpoint,
            the log records and the EMA (``result.ema``).

        Raises:
            ValueError: The checkpoint's config differs (naming the fields), or the world size does; or no
                checkpoint is intact (:class:`~trajflow.checkpoint.DamagedCheckpointError`).
            FileExistsError: ``resume`` is false and ``out_dir`` already holds a run.
        """
        stop_at, evaluate_points = _check_fit_arguments(model, objective, stop_at, evaluate, evaluate_points)
        run_config = {**dict(run_config or {}), "train": dataclasses.asdict(self.config)}
        run_config = json.loads(json.dumps(run_config))  # JSON-normal form: tuples become lists
        self.check_out_dir(resume)
        ckpt, info = self._resume_point(model, run_config, resume, tuple(resume_ignore))
        run = FitState(
            **self._optimization(model, objective, ckpt),
            **self._bookkeeping(objective, dataset, collate_fn, info, stop_at, evaluate, evaluate_points),
            run_config=run_config,
            last_save=_wall_clock(),
            resumed_from=ckpt,
        )
        self._train(run)
        return run.result()

    def _train(self, run: FitState) -> None:
        """The loop: steps, logs, checkpoints and the learning curve, from a fresh run's first point on."""
        if run.curve.evaluate is not None and run.train_time == 0.0 and run.step == 0:
            self._evaluate(run)
        run.wrapped.train()
        while run.step < run.end:
            grad_norm = self._step(run)
            self._log(run, grad_norm)
            self._checkpoint_if_due(run)
            if run.curve.due(self._progress(run), final=run.step == run.end):
                self._evaluate(run)
        run.bar.close()
        run.log.close()

    def _resume_point(
        self, model: nn.Module, run_config: dict[str, Any], resume: bool | str | Path, ignore: tuple[str, ...]
    ) -> tuple[Path | None, dict[str, Any]]:
        """The checkpoint to resume from (or ``None``) and its ``trainer.json``; loads its weights into the plain
        ``model`` (before wrapping, so that DDP broadcasts them and FSDP shards them) and writes ``config.json``."""
        ckpt = checkpoint_to_resume(self.checkpoints, resume, self.print)
        info: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        if ckpt is not None:
            info = check_resume(ckpt, run_config, self.world_size, self.device, ignore)
            model.load_state_dict(load_safetensors(ckpt / MODEL_FILE)[0])
            self.print(f"resume: continuing from {ckpt} (step {info['step']})")
        if self.is_main:
            if resume and (dropped := cut_log(self.out_dir / LOG_FILE, int(info["step"]))):
                self.print(f"resume: dropped {dropped} records after step {info['step']} from {LOG_FILE}")
            save_json(self.out_dir / CONFIG_FILE, run_config)
        return ckpt, info

    def _optimization(self, model: nn.Module, objective: Objective, ckpt: Path | None) -> dict[str, Any]:
        """The wrapped model, optimizer, schedule, EMA and the objective's noise generator (one stream per
        process), restored from ``ckpt`` when there is one. The scheduler is not prepared: accelerate would step
        it once per process, and this loop counts optimizer steps."""
        cfg, acc = self.config, self.accelerator
        groups = _param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scales)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        wrapped, optimizer = acc.prepare(ObjectiveModule(model, objective), optimizer)
        inner = acc.unwrap_model(wrapped).model
        ema = EMA(inner, cfg.ema_decay) if cfg.ema_decay > 0 else None
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(cfg.seed, self.rank, 3))
        if ckpt is not None:
            restore_states(ckpt, wrapped, optimizer, scheduler, ema, generator, rank=self.rank, fsdp=self._is_fsdp)
        return dict(
            wrapped=wrapped, inner=inner, optimizer=optimizer, scheduler=scheduler, ema=ema, generator=generator
        )

    def _bookkeeping(
        self,
        objective: Objective,
        dataset: Dataset,
        collate_fn: Callable | None,
        info: dict[str, Any],
        stop_at: int | None,
        evaluate: Evaluate | None,
        evaluate_points: int,
    ) -> dict[str, Any]:
        """The loop's state from ``info`` (``trainer.json``, or step 0): data position, step, last step, training
        time, log, progress bar, learning curve and, with a time budget, its schedule."""
        cfg = self.config
        position = {"epoch": int(info["epoch"]), "batch_in_epoch": int(info["batch_in_epoch"])}
        step, train_time = int(info["step"]), float(info.get("train_seconds", 0.0))
        writer = tensorboard_writer(self.out_dir / "tb", self.print) if cfg.tensorboard and self.is_main else None
        loss_name = getattr(objective, "loss_name", "loss")
        log = IntervalLog(self.accelerator, self.out_dir / LOG_FILE, loss_name, cfg.batch_size * cfg.grad_accum, writer)
        log.last_loss = float(info.get("loss", float("nan")))  # what a resumed, already finished run returns
        return dict(
            batches=endless_batches(dataset, collate_fn, position, cfg, self.accelerator),
            position=position,
            log=log,
            bar=progress_bar(cfg, step, train_time, show=cfg.progress and self.is_main),
            curve=LearningCurve(evaluate, evaluate_points, cfg.run_progress(step, train_time)),
            step=step,
            end=min(cfg.max_steps, stop_at or cfg.max_steps),
            train_time=train_time,
            timed_lr=CosineWarmup(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) if cfg.time_budget else None,
        )

    def _progress(self, run: FitState) -> float:
        """The share of the run done so far (steps and seconds both come back on resume)."""
        return self.config.run_progress(run.step, run.train_time)

    def _step(self, run: FitState) -> Tensor | None:
        """One optimizer step (:meth:`_accumulate`, then :meth:`_update`) and its bookkeeping: step count,
        training time, log, progress bar, and the end of a time budget. Returns the gradient norm before
        clipping (``None`` without clipping)."""
        cfg = self.config
        t0 = _clock()
        self._accumulate(run, self._progress(run))  # the share of the run done before this step
        grad_norm = self._update(run, t0)
        run.step += 1
        dt = _clock() - t0
        run.train_time += dt
        run.log.tick(dt)
        run.bar.update(min(dt, max(cfg.time_budget - run.bar.n, 0.0)) if cfg.time_budget else 1)
        if cfg.time_budget and run.train_time >= cfg.time_budget:
            run.end = run.step  # the budget is spent: log, checkpoint and stop here
        return grad_norm

    def _accumulate(self, run: FitState, progress: float) -> None:
        """Forward and backward over ``grad_accum`` micro-batches; only the last one synchronises gradients."""
        cfg, acc = self.config, self.accelerator
        for micro in range(cfg.grad_accum):
            batch = to_device(next(run.batches), self.device)
            last = micro == cfg.grad_accum - 1
            sync = acc.no_sync(run.wrapped) if not last and self.world_size > 1 else nullcontext()
            with sync, acc.autocast():
                loss, logs = run.wrapped(batch, run.generator, run.step, progress)
            acc.backward(loss / cfg.grad_accum)
            run.log.add(loss, logs, cfg.grad_accum)

    def _update(self, run: FitState, t0: float) -> Tensor | None:
        """Clip, step, schedule (by steps, or by the share of the run with a time budget, counting this step's
        time from ``t0``) and the EMA; returns the gradient norm before clipping."""
        cfg, acc = self.config, self.accelerator
        grad_norm = acc.clip_grad_norm_(run.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.timed_lr is not None:
            done = cfg.run_progress(run.step + 1, run.train_time + _clock() - t0)
            for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
                group["lr"] = base * run.timed_lr(done * cfg.max_steps)
        if run.ema is not None:
            run.ema.update(run.inner)
        return grad_norm

    def _log(self, run: FitState, grad_norm: Tensor | None) -> None:
        """Every ``log_every`` steps and at the end: one record, the mean over the interval and the processes."""
        if run.step % self.config.log_every and run.step != run.end:
            return
        lr = run.optimizer.param_groups[0]["lr"]
        record = run.log.flush(run.step, run.position["epoch"], lr, grad_norm, run.last_ckpt)
        postfix = {run.log.loss_name: f"{record[run.log.loss_name]:.4f}", "lr": f"{record['lr']:.2e}"}
        run.bar.set_postfix(postfix, refresh=False)

    def _checkpoint_if_due(self, run: FitState) -> None:
        """The checkpoint policy: every ``checkpoint_every`` steps, at the end, and when ``checkpoint_minutes``
        have passed since the last save."""
        cfg = self.config
        if run.step % cfg.checkpoint_every == 0 or run.step == run.end or self._checkpoint_due(run.step, run.last_save):
            run.position["train_seconds"], run.position["loss"] = run.train_time, run.log.last_loss
            run.last_ckpt = self._save(run)
            run.last_save = _wall_clock()

    def _evaluate(self, run: FitState) -> None:
        run.curve.record(run.inner, run.ema, run.step, run.train_time, self._progress(run))


def _check_fit_arguments(
    model: Any, objective: Any, stop_at: Any, evaluate: Any, evaluate_points: Any
) -> tuple[int | None, int]:
    """``stop_at`` and ``evaluate_points`` checked; raises ``TypeError`` / ``ValueError`` naming the argument."""
    if not isinstance(model, nn.Module) or not callable(objective):
        got = f"{type(model).__name__} and {type(objective).__name__}"
        raise TypeError(f"model, objective: expected an nn.Module and a callable Objective, got {got}")
    if stop_at is not None:
        stop_at = check_count("stop_at", stop_at)
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable (model, point) -> dict or None, got {type(evaluate).__name__}")
    return stop_at, check_count("evaluate_points", evaluate_points)
