"""What one toy run is: :class:`ToyConfig`, the methods it trains, and the CPU threads it uses."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from trajflow.checkpoint import dataclass_from_dict
from trajflow.checks import check_count
from trajflow.data.toy import TOY_DENSITIES, toy_density

__all__ = ["METHODS", "RESUME_IGNORED", "DIMS", "ToyConfig", "auto_threads"]

#: The methods one toy job trains, in training order.
METHODS: tuple[str, ...] = ("ntm", "gaussian", "fm", "nsf")

#: Config fields that may differ between a checkpoint and the run that resumes it: they change the
#: evaluation, the machine or how often checkpoints are written, never what a training step computes.
#: The budget (``max_steps`` / ``time_budget``) is not among them: it sets the learning-rate schedule.
RESUME_IGNORED: tuple[str, ...] = (
    "device",
    "threads",
    "progress",
    "methods",
    "test_size",
    "sample_size",
    "elbo_samples",
    "fm_steps_many",
    "checkpoint_every",
    "checkpoint_minutes",
)

DIMS = 2  # every toy density is 2-D


@dataclass
class ToyConfig:
    """Everything that defines one toy run. Saved as ``config.json`` next to the checkpoints.

    Budget: exactly one of ``max_steps`` (optimizer steps, the default) and ``time_budget`` (wall-clock
    training seconds) is set, and every method gets that same budget. With ``max_steps`` all methods see
    exactly the same data points (one fixed-seed sample of ``max_steps * batch_size`` points, each used once)
    and the same learning-rate schedule; with ``time_budget`` the cheaper baselines take more steps.

    Every method trains through :class:`trajflow.train.Trainer`; :func:`examples.toy.train.trainer_config`
    maps these fields onto its :class:`~trajflow.train.TrainerConfig` (``max_steps`` and ``time_budget``
    as they are, ``warmup`` -> ``warmup_steps``, and ``batch_size``, ``lr``, ``min_lr_ratio``,
    ``weight_decay``, ``grad_clip``, ``ema_decay``, ``seed``, ``checkpoint_every``, ``checkpoint_minutes``,
    ``progress`` as they are).

    Attributes:
        density: A name of :data:`trajflow.data.toy.TOY_DENSITIES` (conditional ones are used unconditionally).
        steps: Trajectory levels :math:`T` of NTM and the Gaussian-step model, and the few-step Euler budget
            of flow matching.
        max_steps: Optimizer steps per method (before 0.3.0: ``iters``).
        time_budget: Wall-clock training seconds per method, instead of ``max_steps`` (before 0.3.0:
            ``seconds``).
        batch_size: Fresh data points per optimizer step.
        lr: Peak learning rate (AdamW, betas (0.9, 0.99)), with linear warmup over ``warmup`` of the budget and a
            cosine decay to ``min_lr_ratio * lr``.
        weight_decay: AdamW's decoupled weight decay (on weight matrices only, as the Trainer does).
        grad_clip: Global gradient-norm clip (0: off).
        ema_decay: Decay of the exponential moving average of the weights used for evaluation (0: none).
        width, depth: The residual MLP shared by the NTM predictor, the Gaussian-step predictor and the
            flow-matching velocity; the single NSF's conditioners have ``depth`` hidden layers of ``width``.
        time_features: Size of the sinusoidal time embeddings of the MLPs.
        transporter_transforms, transporter_hidden, transporter_bins: NTM's zuko NSF transporter (autoregressive
            spline transforms, hidden layers of ``transporter_hidden``, spline bins).
        nsf_transforms, nsf_bins: The single-NSF baseline.
        t_min: The cleanest time :math:`t_0` (0: the trajectory starts at the data).
        shift: The time grid's shift (see :func:`trajflow.time_grid`; 1 is uniform).
        fm_steps_many: The many-step Euler budget of flow matching.
        test_size: Held-out data points for the likelihoods.
        sample_size: Samples drawn from every method for the distances, compared with the first
            ``sample_size`` test points (the energy distance costs ``O(sample_size^2)``).
        elbo_samples: Forward trajectories averaged per test point in the ELBO (the bound holds for any).
        seed: Seeds initialisation, the training points and their order, the test set and sampling.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``, ...).
        threads: torch intra-op threads on the CPU, recorded in ``config.json`` and in every checkpoint. A fixed
            count (default 1), because the CPU kernels' results depend on it: 1 and 2 threads train different
            models, and a run resumed with another count is not bit-exact (the Trainer warns). ``None`` picks
            :func:`auto_threads` (the idle cores at launch, which depend on the machine's load: not reproducible).
        methods: Which of :data:`METHODS` to train.
        checkpoint_every: Optimizer steps between checkpoints of each method (one is always written at the end);
            large, so that saving costs little next to the tiny models' steps.
        checkpoint_minutes: Minutes of wall-clock time after which a method also writes a checkpoint (``None``:
            steps only), so that a job killed on a slow or busy machine loses at most that much of its training.
        progress: Show tqdm progress bars.
    """

    density: str = "checkerboard"
    steps: int = 4
    max_steps: int | None = 1200
    time_budget: float | None = None
    batch_size: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.01
    warmup: float = 0.02
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    width: int = 128
    depth: int = 3
    time_features: int = 32
    transporter_transforms: int = 2
    transporter_hidden: int = 64
    transporter_bins: int = 16
    nsf_transforms: int = 5
    nsf_bins: int = 16
    t_min: float = 0.0
    shift: float = 1.0
    fm_steps_many: int = 100
    test_size: int = 5_000
    sample_size: int = 5_000
    elbo_samples: int = 4
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    methods: tuple[str, ...] = METHODS
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 1.0
    progress: bool = True

    #: Keys of configs written before 0.3.0, refused with their new names (a run folder's ``config.json`` too).
    renamed_fields: ClassVar[dict[str, str]] = {"iters": "max_steps", "seconds": "time_budget"}

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):  # "ntm,fm" from a command line; tuple("fm") would split letters
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        if self.density not in TOY_DENSITIES:
            toy_density(self.density)  # raises the ValueError that lists the valid names
        check_count("steps", self.steps, 1)
        if (self.max_steps is None) == (self.time_budget is None):
            raise ValueError(
                f"max_steps, time_budget: expected exactly one training budget, got max_steps={self.max_steps!r} "
                f"and time_budget={self.time_budget!r}"
            )
        if self.max_steps is not None:
            check_count("max_steps", self.max_steps, 1)
        budget = self.time_budget
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"time_budget: expected a positive number of seconds, got {budget!r}")
        for name, low in (
            ("batch_size", 1),
            ("width", 1),
            ("depth", 1),
            ("transporter_transforms", 1),
            ("transporter_hidden", 1),
            ("transporter_bins", 1),
            ("nsf_transforms", 1),
            ("nsf_bins", 1),
            ("fm_steps_many", 1),
            ("test_size", 2),
            ("sample_size", 2),
            ("elbo_samples", 1),
            ("checkpoint_every", 1),
        ):
            check_count(name, getattr(self, name), low)
        if self.sample_size > self.test_size:
            raise ValueError(
                f"sample_size: expected at most test_size={self.test_size} (the distances use that many test "
                f"points), got {self.sample_size}"
            )
        if self.time_features < 2 or self.time_features % 2:
            raise ValueError(f"time_features: expected an even integer >= 2, got {self.time_features!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ValueError(
                f"min_lr_ratio, warmup: expected fractions in [0, 1], got {self.min_lr_ratio!r}, {self.warmup!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1) (0 disables), got {self.ema_decay!r}")
        if not 0.0 <= self.t_min < 1.0 / self.steps:
            raise ValueError(f"t_min: expected a time in [0, {1.0 / self.steps:g}) below the grid, got {self.t_min!r}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift: expected a positive number, got {self.shift!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        if self.threads is not None:
            check_count("threads", self.threads, 1)
        minutes = self.checkpoint_minutes
        numeric = isinstance(minutes, (int, float)) and not isinstance(minutes, bool)
        if minutes is not None and not (numeric and math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"checkpoint_minutes: expected a positive number of minutes or None, got {minutes!r}")
        if self.device not in ("cpu", "cuda", "cuda:0"):
            # The Trainer (accelerate) trains on the process's current device; pick a GPU with CUDA_VISIBLE_DEVICES.
            raise ValueError(
                f"device: expected 'cpu' or 'cuda' (choose the GPU with CUDA_VISIBLE_DEVICES), got {self.device!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        """Rebuild a config saved by :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        return dataclass_from_dict(cls, d, "config")


def auto_threads() -> int:
    """torch CPU threads for a toy run: the cores that are idle right now, at least 1 (``ToyConfig(threads=None)``).

    Not the default: the count depends on the machine's load at launch, and results depend on the count.

    The networks are small (batches of a few hundred 2-D points through MLPs of width ~128), so intra-op
    parallelism gains little even on an idle machine, and on a machine whose cores are already busy (the
    1-minute load average) extra threads spin against the other jobs and make every step several times
    slower. So: all cores when idle, one when busy.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on every platform
        load = 0.0
    return max(1, min(cores, cores - int(load + 0.5)))
