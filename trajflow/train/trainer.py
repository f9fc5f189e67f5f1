"""The training loop itself: :class:`Trainer` (see :mod:`trajflow.train` for what one step does)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
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
from ..checks import accepts_keyword, check_count
from ..ema import EMA
from ..schedules import CosineWarmup, cosine_with_warmup
from .config import Objective, TrainerConfig, TrainResult
from .data_order import ResumableSampler, mix_seed, to_device
from .interval_log import IntervalLog
from .random_state import capture_rng_state, restore_rng_state
from .run_folder import LOG_FILE, check_fresh_start, check_resume, checkpoint_to_resume, cut_log, read_state

__all__ = ["Trainer"]

# The clock of the time budget, behind a module name so that tests can drive a time-budgeted run with a fake one.
_clock = time.perf_counter
# The clock of ``checkpoint_minutes`` (wall-clock time, checkpoints and evaluations included), for tests likewise.
_wall_clock = time.monotonic


# ============================================================================================== model wrapper
class _ObjectiveModule(nn.Module):
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

    The accelerator (and with it ``torch.distributed``) is set up here, so build datasets that read the
    process rank (e.g. :class:`~trajflow.data.text_image.TarShards`) after creating the trainer. Global seeds
    are set here too (from ``config.seed``, the same on every process so that every rank initialises the same
    model).
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
            # Without CUDA, accelerate only joins the processes of a torchrun / ``accelerate launch`` job into one
            # (gloo) group when told it runs on the CPU.
            cpu = config.cpu or not torch.cuda.is_available()
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu, kwargs_handlers=kwargs)
        self.accelerator = accelerator
        self.seed_everything(config.seed)
        self.checkpoints = CheckpointDir(self.out_dir / "checkpoints", keep=config.keep_checkpoints)

    # ------------------------------------------------------------------------------------------ helpers
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

    # ------------------------------------------------------------------------------------------ data
    def _batches(self, dataset: Dataset, collate_fn: Callable | None, state: dict[str, int]) -> Iterator[Any]:
        """Endless batches from ``state`` = {epoch, batch_in_epoch} on; updates ``state`` as it goes."""
        cfg = self.config
        iterable = isinstance(dataset, IterableDataset)
        while True:
            epoch, skip = state["epoch"], state["batch_in_epoch"]
            # A generator for the DataLoader's own draws (worker base seeds): without it, creating the
            # iterator would consume the global RNG at a point that differs between a run and its resumption.
            loader_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, self.rank, 2))
            common = dict(
                batch_size=cfg.batch_size,
                drop_last=True,
                num_workers=cfg.num_workers,
                collate_fn=collate_fn,
                generator=loader_gen,
                pin_memory=self.device.type == "cuda",
            )
            if iterable:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                it = iter(DataLoader(dataset, **common))
                for _ in range(skip):  # streams cannot seek: re-read and drop the consumed batches
                    next(it, None)
            else:
                sampler = ResumableSampler(
                    len(dataset), seed=cfg.seed, shuffle=cfg.shuffle, rank=self.rank, world_size=self.world_size
                )
                per_rank = len(sampler)
                if per_rank < cfg.batch_size:
                    raise ValueError(
                        f"dataset: expected at least batch_size={cfg.batch_size} examples per process, got "
                        f"{per_rank} (dataset of {len(dataset)} over {self.world_size} processes)"
                    )
                sampler.set_position(epoch, skip * cfg.batch_size)
                it = iter(DataLoader(dataset, sampler=sampler, **common))
            while True:
                batch = next(it, None)
                if iterable and self.world_size > 1:
                    # Streams may give ranks different numbers of batches; every rank moves to the next epoch
                    # as soon as one runs dry, or the others would wait forever in the gradient all-reduce.
                    have = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
                    if float(self.accelerator.gather(have).min()) == 0.0:
                        batch = None
                if batch is None:
                    break
                state["batch_in_epoch"] += 1
                yield batch
            if state["batch_in_epoch"] == skip and skip == 0:
                raise ValueError("dataset: yielded no complete batch in a whole epoch (is it empty or too small?)")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(
        self,
        step: int,
        state: dict[str, int],
        wrapped: nn.Module,
        optimizer: Any,
        scheduler: Any,
        ema: EMA | None,
        generator: torch.Generator,
        run_config: Mapping[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` (every rank calls this: FSDP gathers shards collectively)."""
        acc = self.accelerator
        staging = self.checkpoints.root / f".{CheckpointDir.name(step)}.tmp"
        if self.is_main:
            staging = self.checkpoints.staging(step)
        acc.wait_for_everyone()
        save_state(staging / f"rng-rank{self.rank}.safetensors", capture_rng_state(generator))
        model_state = acc.get_state_dict(wrapped)  # full tensors on the main process (FSDP: gathered)
        ema_state = ema.state_dict() if ema is not None else None  # collective under FSDP
        if self._is_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(
                wrapped,
                optimizer.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        else:
            opt_state = optimizer.state_dict() if self.is_main else None
        if self.is_main:
            prefix = "model."
            model_state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
            meta = {"step": str(step)}
            save_safetensors(staging / MODEL_FILE, model_state, meta)
            if ema_state is not None:
                save_safetensors(staging / EMA_FILE, ema_state, {**meta, **ema.metadata()})
            save_state(staging / "optimizer.safetensors", opt_state)
            save_state(staging / "scheduler.safetensors", scheduler.state_dict())
            info = {**state, "step": step, "world_size": self.world_size, "threads": torch.get_num_threads()}
            save_json(staging / TRAINER_FILE, info)
            save_json(staging / CONFIG_FILE, dict(run_config))
        acc.wait_for_everyone()
        final = self.checkpoints.root / CheckpointDir.name(step)
        if self.is_main:
            final = self.checkpoints.commit(staging, step)
        acc.wait_for_everyone()
        return final

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

    # ------------------------------------------------------------------------------------------ fit
    def fit(
        self,
        model: nn.Module,
        objective: Objective,
        dataset: Dataset,
        *,
        run_config: Mapping[str, Any] | None = None,
        collate_fn: Callable | None = None,
        resume: bool | str | Path = False,
        stop_at: int | None = None,
        evaluate: Callable[[nn.Module, dict[str, float]], Mapping[str, float] | None] | None = None,
        evaluate_points: int = 10,
    ) -> TrainResult:
        """Train ``model`` for ``config.steps`` optimizer steps (or until ``stop_at``, or until the time budget is
        spent), checkpointing as it goes.

        When it returns, ``model`` holds the raw weights of the last optimizer step, **not** the EMA of them
        that the checkpoints' ``ema.safetensors`` hold: ``result.ema.copy_to(model)`` puts the averages in
        (see :class:`TrainResult`).

        Arguments:
            model: The model to train (a plain module; it is wrapped for DDP/FSDP here).
            objective: See :class:`Objective`.
            dataset: A map-style dataset (any order, resumable exactly) or an ``IterableDataset``.
            run_config: Everything that defines the run (model, data, ...); saved as ``config.json`` with the
                trainer's own config under ``"train"``, and compared on resume.
            collate_fn: The DataLoader's collate function.
            resume: ``True``: continue from the newest intact checkpoint in ``out_dir`` (or start afresh if
                there is none); a path: continue from that step folder, or the newest intact one of that run;
                ``False``: start afresh, which an ``out_dir`` that already holds a run refuses. Checkpoints are
                verified against their manifest first; a damaged one is skipped for the next older one with a
                warning naming it. ``log.jsonl`` is cut back to the step resumed from.
            stop_at: Stop after this step (checkpointed) without changing the schedule, as an interruption
                would; used by tests of resumption.
            evaluate: Called as ``evaluate(model, point)`` at the start of a fresh run and each time the run
                passes another ``1 / evaluate_points`` of its length (of ``time_budget`` when timed, else of
                ``steps``): a learning curve. ``model`` holds the EMA weights (the raw ones when there is no
                EMA) and is in eval mode; ``point`` has ``step``, ``train_seconds`` and ``progress`` in [0, 1].
                Its time is not training time. What it returns is added to ``point``, and the points are
                :attr:`TrainResult.evaluations`. Points passed before a resumption are not repeated.
            evaluate_points: How many evaluations after the start (10: every 10% of the run).

        Returns:
            A :class:`TrainResult`: the step reached, the last logged loss, the timings, the last checkpoint,
            the log records and the EMA (``result.ema``).

        Raises:
            ValueError: The checkpoint's config differs (naming the fields), or the world size does; or no
                checkpoint is intact (:class:`~trajflow.checkpoint.DamagedCheckpointError`).
            FileExistsError: ``resume`` is false and ``out_dir`` already holds a run.
        """
        if not isinstance(model, nn.Module) or not callable(objective):
            got = f"{type(model).__name__} and {type(objective).__name__}"
            raise TypeError(f"model, objective: expected an nn.Module and a callable Objective, got {got}")
        if stop_at is not None:
            stop_at = check_count("stop_at", stop_at)
        if evaluate is not None and not callable(evaluate):
            raise TypeError(
                f"evaluate: expected a callable (model, point) -> dict or None, got {type(evaluate).__name__}"
            )
        evaluate_points = check_count("evaluate_points", evaluate_points)
        cfg, acc = self.config, self.accelerator
        run_config = {**dict(run_config or {}), "train": dataclasses.asdict(cfg)}
        run_config = json.loads(json.dumps(run_config))  # JSON-normal form: tuples become lists
        self.check_out_dir(resume)

        # -- where to start: a checkpoint's weights go into the plain model before wrapping, so that DDP
        #    broadcasts them and FSDP shards them
        ckpt = checkpoint_to_resume(self.checkpoints, resume, self.print)
        info: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        if ckpt is not None:
            info = check_resume(ckpt, run_config, self.world_size, self.device)
            model.load_state_dict(load_safetensors(ckpt / MODEL_FILE)[0])
            self.print(f"resume: continuing from {ckpt} (step {info['step']})")
        if self.is_main:
            if resume and (dropped := cut_log(self.out_dir / LOG_FILE, int(info["step"]))):
                self.print(f"resume: dropped {dropped} records after step {info['step']} from {LOG_FILE}")
            save_json(self.out_dir / CONFIG_FILE, run_config)

        # -- optimizer, schedule, EMA and the objective's noise generator (one stream per process). The
        #    scheduler is not prepared: accelerate would step it once per process, and this loop counts
        #    optimizer steps.
        groups = _param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scales)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        wrapped, optimizer = acc.prepare(_ObjectiveModule(model, objective), optimizer)
        inner = acc.unwrap_model(wrapped).model
        ema = EMA(inner, cfg.ema_decay) if cfg.ema_decay > 0 else None
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(cfg.seed, self.rank, 3))
        if ckpt is not None:
            self._restore(ckpt, wrapped, optimizer, scheduler, ema, generator)

        # -- bookkeeping: data position, step, time, logs
        state = {"epoch": int(info["epoch"]), "batch_in_epoch": int(info["batch_in_epoch"])}
        step = start = int(info["step"])
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        batches = self._batches(dataset, collate_fn, state)
        log = IntervalLog(self, getattr(objective, "loss_name", "loss"), cfg.batch_size * cfg.grad_accum)
        log.last_loss = float(info.get("loss", float("nan")))  # what a resumed, already finished run returns
        params = [p for p in wrapped.parameters() if p.requires_grad]
        train_time = resumed_time = float(info.get("train_seconds", 0.0))  # carried across resumptions
        # Progress in steps, or in seconds of the budget when the run is timed (its step cap is never reached).
        bar = tqdm(
            total=cfg.time_budget or cfg.steps,
            initial=min(train_time, cfg.time_budget) if cfg.time_budget else step,
            disable=not (cfg.progress and self.is_main),
            desc="train",
            unit="s" if cfg.time_budget else "it",
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            if cfg.time_budget
            else None,
            dynamic_ncols=True,
        )
        timed_lr = CosineWarmup(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio) if cfg.time_budget else None
        last_ckpt = ckpt
        last_save = _wall_clock()

        evaluations: list[dict[str, float]] = []

        def progress_now() -> float:
            return cfg.run_progress(step, train_time)

        def run_evaluation() -> None:
            point = {"step": float(step), "train_seconds": train_time, "progress": progress_now()}
            with ema.average_parameters(inner) if ema is not None else nullcontext(inner):
                inner.eval()
                point.update(evaluate(inner, dict(point)) or {})
                inner.train()
            evaluations.append(point)

        next_point = math.floor(progress_now() * evaluate_points + 1e-9) + 1  # the next 1/evaluate_points mark
        if evaluate is not None and train_time == 0.0 and step == 0:
            run_evaluation()

        wrapped.train()
        while step < end:
            t0 = _clock()
            # The share of the run done before this step (steps and seconds both come back on resume).
            progress = cfg.run_progress(step, train_time)
            # -- forward and backward, one micro-batch at a time; only the last one synchronises gradients
            for micro in range(cfg.grad_accum):
                batch = to_device(next(batches), self.device)
                sync = acc.no_sync(wrapped) if micro < cfg.grad_accum - 1 and self.world_size > 1 else nullcontext()
                with sync, acc.autocast():
                    loss, logs = wrapped(batch, generator, step, progress)
                acc.backward(loss / cfg.grad_accum)
                log.add(loss, logs, cfg.grad_accum)

            # -- the update: clip, step, schedule (by steps, or by the share of the run with a time budget), EMA
            grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if timed_lr is not None:
                done = cfg.run_progress(step + 1, train_time + _clock() - t0)
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base * timed_lr(done * cfg.steps)
            if ema is not None:
                ema.update(inner)
            step += 1
            dt = _clock() - t0
            train_time += dt
            log.tick(dt)
            bar.update(min(dt, max(cfg.time_budget - bar.n, 0.0)) if cfg.time_budget else 1)
            if cfg.time_budget and train_time >= cfg.time_budget:
                end = step  # the budget is spent: log, checkpoint and stop here

            # -- log (mean over the interval and the processes) and checkpoint
            if step % cfg.log_every == 0 or step == end:
                record = log.flush(step, state["epoch"], optimizer.param_groups[0]["lr"], grad_norm, last_ckpt)
                bar.set_postfix(
                    {log.loss_name: f"{record[log.loss_name]:.4f}", "lr": f"{record['lr']:.2e}"}, refresh=False
                )
            if step % cfg.checkpoint_every == 0 or step == end or self._checkpoint_due(step, last_save):
                state["train_seconds"], state["loss"] = train_time, log.last_loss
                last_ckpt = self._save(step, state, wrapped, optimizer, scheduler, ema, generator, run_config)
                last_save = _wall_clock()
            # -- the learning curve: evaluate each time another share of the run has passed
            if evaluate is not None and (progress_now() * evaluate_points >= next_point - 1e-9 or step == end):
                run_evaluation()
                next_point = math.floor(progress_now() * evaluate_points + 1e-9) + 1
        bar.close()
        log.close()
        return TrainResult(
            step=step,
            epoch=state["epoch"],
            loss=log.last_loss,
            images_per_s=log.global_batch * max(step - start, 0) / max(train_time - resumed_time, 1e-9),
            train_seconds=train_time,
            checkpoint=last_ckpt,
            history=log.history,
            ema=ema,
            evaluations=evaluations,
            resumed_from=ckpt,
            start_step=start,
        )

    def _restore(
        self,
        ckpt: Path,
        wrapped: nn.Module,
        optimizer: Any,
        scheduler: Any,
        ema: EMA | None,
        generator: torch.Generator,
    ) -> None:
        """Load the optimizer, scheduler, EMA and random states of ``ckpt`` (the weights are already in)."""
        if self._is_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                wrapped,
                optimizer.optimizer,
                read_state(ckpt, "optimizer"),
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
            )
        else:
            # Loaded on the CPU; load_state_dict moves each state tensor to its parameter's device.
            optimizer.load_state_dict(read_state(ckpt, "optimizer"))
        scheduler.load_state_dict(read_state(ckpt, "scheduler"))
        if ema is not None:
            averaged, meta = load_safetensors(ckpt / EMA_FILE)
            ema.load_state_dict(averaged, meta)
        # Last of all, so that nothing between here and the first step consumes a random number.
        restore_rng_state(read_state(ckpt, f"rng-rank{self.rank}"), generator)

    def _tensorboard(self) -> Any:
        if not (self.config.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.print("tensorboard: not installed (pip install tensorboard); logging to log.jsonl only")
            return None
        return SummaryWriter(str(self.out_dir / "tb"))
