r"""The training loop: one CPU process, one GPU, or many GPUs/machines through Hugging Face ``accelerate``.

:class:`Trainer` knows nothing about NTM. It trains any ``nn.Module`` with an *objective*: a callable
``objective(model, batch, generator) -> loss`` (or ``(loss, {name: value})``) whose loss is a float32 scalar.
The text-to-image recipe (:mod:`trajflow.t2i`) builds its objective from :class:`~trajflow.TrajectoryNLL`
(NTM) or :class:`~trajflow.flow_matching.FlowMatchingLoss` (the baseline), on the same backbone.

What one optimizer step does (NTM Table 5 where it says, TarFlow/STARFlow defaults where it does not):

* ``grad_accum`` micro-batches of ``batch_size`` examples per process, the forward pass under bf16 autocast
  when ``mixed_precision="bf16"`` (the library computes log-determinants and losses in float32 regardless);
* gradients synchronised across processes (DDP or FSDP, chosen by ``accelerate launch``), clipped to
  ``grad_clip`` in global norm;
* AdamW with betas (0.9, 0.95) and decoupled weight decay on matrices only (biases and norm gains are not
  decayed), then the cosine-with-warmup learning rate of :mod:`trajflow.schedules`;
* an EMA of the weights (:mod:`trajflow.ema`).

Exact resumption. A checkpoint (see :mod:`trajflow.checkpoint` for the layout) holds the model, the EMA,
the optimizer and scheduler states, every random state of every rank (python, numpy, torch CPU and CUDA,
and the ``torch.Generator`` handed to the objective) and the position in the data: the epoch and how many
batches of it were consumed. Data order comes from :class:`ResumableSampler`, a permutation seeded by
``(seed, epoch)`` alone, so a resumed run skips exactly the consumed part of the epoch and then sees the same
batches, draws the same noise and takes the same steps as a run that was never interrupted: on the CPU the
parameters agree bit for bit (``tests/test_train.py`` checks it). Streams (``IterableDataset``, e.g. tar
shards) are re-opened at the epoch start and the consumed batches skipped. Caveat: random augmentations
drawn inside DataLoader *worker processes* (``num_workers > 0``) are seeded per worker and will differ after
a resume; with ``num_workers=0`` they come from the restored global RNG and are exact too.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> def objective(model, batch, generator):
    ...     (x,) = batch
    ...     return (model(x) - 1.0).square().mean()
    >>> import tempfile
    >>> cfg = TrainerConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3, progress=False)
    >>> trainer = Trainer(cfg, tempfile.mkdtemp())
    >>> result = trainer.fit(torch.nn.Linear(2, 1), objective, TensorDataset(torch.randn(16, 2)))
    >>> result.step, result.checkpoint.name
    (3, 'step-0000003')
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    CheckpointDir,
    check_config,
    load_json,
    load_safetensors,
    load_torch,
    resolve_checkpoint,
    save_json,
    save_safetensors,
    save_torch,
)
from .ema import EMA
from .schedules import CosineWarmup, cosine_with_warmup

__all__ = [
    "TrainerConfig",
    "Trainer",
    "TrainResult",
    "Objective",
    "ResumableSampler",
    "RESUME_IGNORED_FIELDS",
    "capture_rng_state",
    "restore_rng_state",
    "mix_seed",
]

#: Config fields that may change between a checkpoint and its resumption: they change how often things are
#: logged or saved and where, never what is computed. Everything else must match (see :func:`check_config`).
RESUME_IGNORED_FIELDS: tuple[str, ...] = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.num_workers",
    "train.tensorboard",
    "train.progress",
    "sample.",
    "name",
)

_MIXED_PRECISION = ("no", "bf16")


# ============================================================================================== config
@dataclass
class TrainerConfig:
    """Hyper-parameters of :class:`Trainer`.

    Attributes:
        steps: Optimizer steps in the whole run (the cosine schedule ends there). With ``time_budget``, the
            most steps the run may take, and the scale of ``warmup_steps`` (see there).
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
        keep_checkpoints: How many checkpoints to keep.
        num_workers: DataLoader worker processes per training process.
        shuffle: Shuffle the data each epoch.
        tensorboard: Also write TensorBoard scalars (needs the ``tensorboard`` package).
        progress: Show a tqdm progress bar (main process only).
        cpu: Train on the CPU even where a GPU is visible.
        find_unused_parameters: DDP's flag, for models that leave some parameters out of some steps.
        time_budget: Train for this many seconds of optimizer steps (``TrainResult.train_seconds``: data,
            forward, backward and update; not checkpoints or start-up) instead of a number of steps: the
            cosine schedule follows the elapsed share of the budget (warmup over ``warmup_steps / steps`` of
            it) and the run stops at the first step past the budget (or at ``steps``), with a checkpoint.
            For comparisons at equal wall-clock time on a machine whose load changes; such a run is not
            bit-reproducible, and a resumed one continues from the seconds recorded in its checkpoint.
    """

    steps: int = 10_000
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
    keep_checkpoints: int = 3
    num_workers: int = 0
    shuffle: bool = True
    tensorboard: bool = False
    progress: bool = True
    cpu: bool = False
    find_unused_parameters: bool = False
    time_budget: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"train.{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"train.warmup_steps: expected an integer in 0..steps={self.steps}, got {self.warmup_steps!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"train.lr: expected a positive learning rate, got {self.lr!r}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError(
                f"train.time_budget: expected a positive number of seconds or null, got {self.time_budget!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio: expected a fraction in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay, train.grad_clip: expected non-negative numbers")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a number in [0, 1) (0 disables), got {self.ema_decay!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(
                f"train.mixed_precision: expected one of {_MIXED_PRECISION} (fp16 would need loss scaling and "
                f"is not supported), got {self.mixed_precision!r}"
            )
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"train.num_workers: expected a non-negative integer, got {self.num_workers!r}")


class Objective(Protocol):
    """What :class:`Trainer` optimises: ``objective(model, batch, generator)``.

    Returns a scalar float32 loss, or ``(loss, logs)`` with extra scalars to log. ``batch`` is what the
    DataLoader yields, already moved to the device; ``generator`` is the process's ``torch.Generator`` on
    that device, which the objective should use for every random draw (it is saved in checkpoints).
    An optional attribute ``loss_name`` (e.g. ``"nll_per_dim"``) names the loss in logs.
    """

    def __call__(
        self, model: nn.Module, batch: Any, generator: torch.Generator
    ) -> Tensor | tuple[Tensor, Mapping[str, Tensor]]: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every process)."""

    step: int
    epoch: int
    loss: float  # the last logged loss, averaged over processes
    images_per_s: float  # global examples per second of training (checkpointing excluded)
    train_seconds: float
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)


# ============================================================================================== data
def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (a fixed, platform-independent hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler[int]):
    """A per-rank sampler whose epoch order depends only on ``(seed, epoch)`` and that can start mid-epoch.

    Every rank draws the same permutation of ``range(length)``, drops the tail that does not divide evenly
    (so that ranks take the same number of steps, which DDP needs) and takes every ``world_size``-th index
    from ``rank``. :meth:`set_position` selects the epoch and how many of this rank's indices to skip.

    Example:
        >>> s = ResumableSampler(10, seed=0, rank=1, world_size=2)
        >>> s.set_position(epoch=0, start=0); full = list(s)
        >>> s.set_position(epoch=0, start=2); list(s) == full[2:]
        True
        >>> len(full)
        5
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise ValueError(f"length: expected a non-empty dataset, got length {length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in 0..{world_size - 1}, got {rank}")
        self.length, self.seed, self.shuffle = length, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        usable = self.length - self.length % self.world_size
        return perm[self.rank : usable : self.world_size]

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.length // self.world_size - self.start)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; strings and other values are left alone."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and any(isinstance(v, Tensor) for v in batch):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ============================================================================================== RNG
def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step may consume, as tensors and plain values (``weights_only``-safe).

    Python's ``random``, numpy's legacy global generator, torch's CPU generator, every CUDA device's
    generator, and ``generator`` (the objective's) when given.
    """
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_key.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Undo :func:`capture_rng_state`: set every generator back to the captured state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


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

    def forward(self, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.objective(self.model, batch, generator)
        loss, logs = (out, {}) if isinstance(out, Tensor) else (out[0], dict(out[1]))
        return loss, logs


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and higher-rank weights), not biases, norm gains or scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ============================================================================================== trainer
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
        save_torch(staging / f"rng-rank{self.rank}.pt", capture_rng_state(generator))
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
            save_torch(staging / "optimizer.pt", opt_state)
            save_torch(staging / "scheduler.pt", scheduler.state_dict())
            save_json(staging / "trainer.json", {**state, "step": step, "world_size": self.world_size})
            save_json(staging / CONFIG_FILE, dict(run_config))
        acc.wait_for_everyone()
        final = self.checkpoints.root / CheckpointDir.name(step)
        if self.is_main:
            final = self.checkpoints.commit(staging, step)
        acc.wait_for_everyone()
        return final

    def _check_resume(self, ckpt: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
        check_config(
            run_config,
            load_json(ckpt / CONFIG_FILE),
            ignore=RESUME_IGNORED_FIELDS,
            source=f"the checkpoint {str(ckpt)!r}",
        )
        info = load_json(ckpt / "trainer.json")
        if info["world_size"] != self.world_size:
            raise ValueError(
                f"world_size: the checkpoint {str(ckpt)!r} was written by {info['world_size']} processes, this run "
                f"has {self.world_size}; the data order (and so exact resumption) depends on it"
            )
        return info

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
    ) -> TrainResult:
        """Train ``model`` for ``config.steps`` optimizer steps (or until ``stop_at``), checkpointing as it goes.

        Arguments:
            model: The model to train (a plain module; it is wrapped for DDP/FSDP here).
            objective: See :class:`Objective`.
            dataset: A map-style dataset (any order, resumable exactly) or an ``IterableDataset``.
            run_config: Everything that defines the run (model, data, ...); saved as ``config.json`` with the
                trainer's own config under ``"train"``, and compared on resume.
            collate_fn: The DataLoader's collate function.
            resume: ``True``: continue from the newest checkpoint in ``out_dir`` (or start afresh if there
                is none); a path: continue from that checkpoint; ``False``: start afresh.
            stop_at: Stop after this step (checkpointed) without changing the schedule, as an interruption
                would; used by tests of resumption.

        Raises:
            ValueError: The checkpoint's config differs (naming the fields), or the world size does.
        """
        cfg, acc = self.config, self.accelerator
        run_config = {**dict(run_config or {}), "train": dataclasses.asdict(cfg)}
        run_config = json.loads(json.dumps(run_config))  # JSON-normal form: tuples become lists

        ckpt: Path | None = None
        if resume is True:
            ckpt = self.checkpoints.latest()
            if ckpt is None:
                self.print(f"resume: no checkpoint in {self.checkpoints.root}, starting from step 0")
        elif resume:
            ckpt = resolve_checkpoint(resume)
        info: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        if ckpt is not None:
            info = self._check_resume(ckpt, run_config)
            # Weights go into the plain model before wrapping, so that DDP broadcasts and FSDP shards them.
            weights, _ = load_safetensors(ckpt / MODEL_FILE)
            model.load_state_dict(weights)
            self.print(f"resume: continuing from {ckpt} (step {info['step']})")
        if self.is_main:
            save_json(self.out_dir / CONFIG_FILE, run_config)

        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        wrapped = _ObjectiveModule(model, objective)
        # The scheduler is not prepared: accelerate would step it once per process, and this loop counts
        # optimizer steps.
        wrapped, optimizer = acc.prepare(wrapped, optimizer)
        inner = acc.unwrap_model(wrapped).model
        ema = EMA(inner, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # One generator per process for the objective's noise (different streams on different ranks).
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(cfg.seed, self.rank, 3))

        if ckpt is not None:
            if self._is_fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    wrapped,
                    optimizer.optimizer,
                    load_torch(ckpt / "optimizer.pt"),
                    options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
                )
            else:
                # Loaded on the CPU; load_state_dict moves each state tensor to its parameter's device.
                optimizer.load_state_dict(load_torch(ckpt / "optimizer.pt"))
            scheduler.load_state_dict(load_torch(ckpt / "scheduler.pt"))
            if ema is not None:
                averaged, meta = load_safetensors(ckpt / EMA_FILE)
                ema.load_state_dict(averaged, meta)
            rng_file = ckpt / f"rng-rank{self.rank}.pt"
            # Last of all, so that nothing between here and the first step consumes a random number.
            restore_rng_state(load_torch(rng_file), generator)

        state = {"epoch": int(info["epoch"]), "batch_in_epoch": int(info["batch_in_epoch"])}
        step = int(info["step"])
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        batches = self._batches(dataset, collate_fn, state)
        loss_name = getattr(objective, "loss_name", "loss")
        writer = self._tensorboard()
        log_path = self.out_dir / "log.jsonl"
        history: list[dict[str, float]] = []
        params = [p for p in wrapped.parameters() if p.requires_grad]
        bar = tqdm(
            total=cfg.steps, initial=step, disable=not (cfg.progress and self.is_main), desc="train", dynamic_ncols=True
        )
        window_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        window_logs: dict[str, Tensor] = {}
        window_steps, window_time = 0, 0.0
        train_time = float(info.get("train_seconds", 0.0)) if cfg.time_budget else 0.0
        resumed_time = train_time
        timed_lr = CosineWarmup(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio) if cfg.time_budget else None
        last_loss, last_ckpt = float("nan"), ckpt
        global_batch = cfg.batch_size * cfg.grad_accum * self.world_size
        wrapped.train()
        while step < end:
            t0 = time.perf_counter()
            for micro in range(cfg.grad_accum):
                batch = _to_device(next(batches), self.device)
                # Only the last micro-batch synchronises gradients across processes.
                sync = acc.no_sync(wrapped) if micro < cfg.grad_accum - 1 and self.world_size > 1 else nullcontext()
                with sync, acc.autocast():
                    loss, logs = wrapped(batch, generator)
                acc.backward(loss / cfg.grad_accum)
                window_loss += loss.detach().double() / cfg.grad_accum
                for k, v in logs.items():
                    window_logs[k] = window_logs.get(k, 0.0) + torch.as_tensor(v).detach().double() / cfg.grad_accum
            grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if timed_lr is not None:
                # The schedule follows the elapsed share of the time budget, on the scale of `steps`.
                progress = min((train_time + time.perf_counter() - t0) / cfg.time_budget, 1.0)
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base * timed_lr(progress * cfg.steps)
            if ema is not None:
                ema.update(inner)
            step += 1
            window_steps += 1
            dt = time.perf_counter() - t0
            window_time += dt
            train_time += dt
            bar.update(1)
            if cfg.time_budget and train_time >= cfg.time_budget:
                end = step  # the budget is spent: log, checkpoint and stop here

            if step % cfg.log_every == 0 or step == end:
                mean = acc.reduce(window_loss, "mean") / window_steps
                last_loss = float(mean)
                if not math.isfinite(last_loss):
                    raise FloatingPointError(
                        f"loss: became {last_loss} by step {step}; lower train.lr, keep train.grad_clip on, or "
                        f"check the data (last checkpoint: {last_ckpt})"
                    )
                record = {
                    "step": step,
                    "epoch": state["epoch"],
                    loss_name: last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": global_batch * window_steps / max(window_time, 1e-9),
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                for k, v in window_logs.items():
                    record[k] = float(acc.reduce(v, "mean")) / window_steps
                history.append(record)
                if self.is_main:
                    bar.set_postfix({loss_name: f"{last_loss:.4f}", "lr": f"{record['lr']:.2e}"}, refresh=False)
                    with open(log_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k, v in record.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                window_loss.zero_()
                window_logs, window_steps, window_time = {}, 0, 0.0

            if step % cfg.checkpoint_every == 0 or step == end:
                state["train_seconds"] = train_time
                last_ckpt = self._save(step, state, wrapped, optimizer, scheduler, ema, generator, run_config)
        bar.close()
        if writer is not None:
            writer.close()
        return TrainResult(
            step=step,
            epoch=state["epoch"],
            loss=last_loss,
            images_per_s=global_batch * max(step - int(info["step"]), 0) / max(train_time - resumed_time, 1e-9),
            train_seconds=train_time,
            checkpoint=last_ckpt,
            history=history,
        )

    def _tensorboard(self) -> Any:
        if not (self.config.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.print("tensorboard: not installed (pip install tensorboard); logging to log.jsonl only")
            return None
        return SummaryWriter(str(self.out_dir / "tb"))
