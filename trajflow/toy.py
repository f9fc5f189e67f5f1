r"""The toy experiment: NTM against its baselines on a 2-D density, trained and evaluated in one job.

This module is the library side of ``trajflow toy`` (:mod:`trajflow.cli`) and of ``benchmarks/toy.py``.
One call of :func:`run_toy` trains, on the same stream of data points and for the same number of optimizer
steps (or the same wall-clock seconds, see :class:`ToyConfig`):

* ``ntm``: an NTM with ``steps`` levels: a zuko NSF transporter (:class:`~trajflow.transporters.ZukoTransporter`)
  and an :class:`~trajflow.predictors.MLPPredictor`, trained on the exact trajectory NLL
  (:class:`~trajflow.TrajectoryNLL`) with :math:`t_{\min} = 0`, so that the trajectory starts at the data
  and the ELBO bounds :math:`\log p(x_0)` of the data itself;
* ``gaussian``: the same NTM with the identity transporter (every reverse step a diagonal Gaussian: the
  "Gaussian bottleneck" of the paper), same predictor;
* ``fm``: flow matching on the same residual MLP (:class:`~trajflow.velocity.MLPVelocity`), sampled
  with Euler at ``steps`` steps and at ``fm_steps_many`` steps;
* ``nsf``: a single zuko neural spline flow fitted by maximum likelihood (exact NLL).

then evaluates every method on held-out data (ELBO / exact NLL in nats per dimension) and on samples
(energy distance and sliced Wasserstein-2 to held-out data, :mod:`trajflow.metrics`), writes a figure and
``metrics.json``, and keeps resumable checkpoints.

Example:
    >>> import tempfile
    >>> cfg = ToyConfig(iters=2, batch_size=64, test_size=200, sample_size=200, elbo_samples=1,
    ...                 fm_steps_many=8, progress=False)
    >>> result = run_toy(cfg, tempfile.mkdtemp())
    >>> sorted(result.metrics["methods"])
    ['fm-euler-4', 'fm-euler-8', 'gaussian', 'nsf', 'ntm']
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zuko
from torch import Tensor, nn
from tqdm.auto import tqdm

from .baselines.flow_matching import FlowMatchingLoss, euler_sample
from .checkpoint import check_config, load_json, load_torch, save_json, save_torch
from .data.toy import TOY_DENSITIES, toy_density
from .ema import EMA
from .losses import TrajectoryNLL
from .metrics import energy_distance, sliced_wasserstein
from .model import NTM
from .predictors import MLPPredictor
from .process import MarkovInterpolant, time_grid
from .transporters import IdentityTransporter, ZukoTransporter
from .velocity import MLPVelocity

__all__ = [
    "METHODS",
    "ToyConfig",
    "TrainRecord",
    "ToyResult",
    "build_model",
    "train_method",
    "train_ntm",
    "train_gaussian",
    "train_flow_matching",
    "train_nsf",
    "evaluate_method",
    "run_toy",
    "plot_toy",
    "metrics_to_rows",
    "auto_threads",
]

#: The methods one toy job trains, in training order.
METHODS: tuple[str, ...] = ("ntm", "gaussian", "fm", "nsf")

#: Config fields that may differ between a checkpoint and the run that resumes it: they change the budget,
#: the evaluation or the machine, never what a training step computes.
RESUME_IGNORED: tuple[str, ...] = (
    "iters",
    "seconds",
    "device",
    "threads",
    "progress",
    "methods",
    "test_size",
    "sample_size",
    "elbo_samples",
    "fm_steps_many",
    "checkpoint_seconds",
)

_DIMS = 2  # every toy density is 2-D
# Offsets of the seeds of the independent random streams of one run, so that e.g. the test set never
# overlaps the training stream and every method sees the same training data.
_SEED_TEST, _SEED_SAMPLE, _SEED_EVAL, _SEED_REFERENCE = 10_007, 20_011, 30_013, 40_009


# ============================================================================================== config
@dataclass
class ToyConfig:
    """Everything that defines one toy run. Saved as ``config.json`` next to the checkpoints.

    Budget: exactly one of ``iters`` (optimizer steps, the default) and ``seconds`` (wall-clock training time)
    is set, and every method gets that same budget. With ``iters`` all methods see exactly the same data
    points (the same seeded stream) and the same learning-rate schedule; with ``seconds`` the cheaper
    baselines take more steps.

    Attributes:
        density: A name of :data:`trajflow.data.toy.TOY_DENSITIES` (conditional ones are used unconditionally).
        steps: Trajectory levels :math:`T` of NTM and the Gaussian-step model, and the few-step Euler budget
            of flow matching.
        iters: Optimizer steps per method.
        seconds: Wall-clock training seconds per method (instead of ``iters``).
        batch_size: Fresh data points per optimizer step.
        lr: Peak learning rate (AdamW), with linear warmup over ``warmup`` of the budget and a cosine decay to
            ``min_lr_ratio * lr``.
        weight_decay: AdamW's decoupled weight decay.
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
        seed: Seeds initialisation, the training stream, the test set and sampling.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``, ...).
        threads: torch intra-op threads on the CPU (``None``: :func:`auto_threads`).
        methods: Which of :data:`METHODS` to train.
        checkpoint_seconds: Seconds between checkpoints during training (one is always written at the end).
        progress: Show tqdm progress bars.
    """

    density: str = "checkerboard"
    steps: int = 4
    iters: int | None = 1200
    seconds: float | None = None
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
    threads: int | None = None
    methods: tuple[str, ...] = METHODS
    checkpoint_seconds: float = 20.0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):  # "ntm,fm" from a command line; tuple("fm") would split letters
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        if self.density not in TOY_DENSITIES:
            toy_density(self.density)  # raises the ValueError that lists the valid names
        _check_int("steps", self.steps, 1)
        if (self.iters is None) == (self.seconds is None):
            raise ValueError(
                f"iters, seconds: expected exactly one training budget, got iters={self.iters!r} and "
                f"seconds={self.seconds!r}"
            )
        if self.iters is not None:
            _check_int("iters", self.iters, 1)
        if self.seconds is not None and not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise ValueError(f"seconds: expected a positive number of seconds, got {self.seconds!r}")
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
        ):
            _check_int(name, getattr(self, name), low)
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
            _check_int("threads", self.threads, 1)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        """Rebuild a config saved by :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown ToyConfig fields {unknown}")
        return cls(**d)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def auto_threads() -> int:
    """torch CPU threads for a toy run: the cores that are idle right now, at least 1.

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


# ============================================================================================== models
def num_params(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_model(method: str, cfg: ToyConfig) -> nn.Module:
    """The untrained model of ``method`` (one of :data:`METHODS`), initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # the same initial MLP weights whatever ran before
    if method in ("ntm", "gaussian"):
        if method == "ntm":
            transporter = ZukoTransporter(
                _DIMS,
                transforms=cfg.transporter_transforms,
                hidden_features=(cfg.transporter_hidden,) * 2,
                bins=cfg.transporter_bins,
            )
        else:
            transporter = IdentityTransporter(_DIMS)
        predictor = MLPPredictor(_DIMS, width=cfg.width, depth=cfg.depth, time_features=cfg.time_features)
        return NTM(transporter, predictor)
    if method == "fm":
        return MLPVelocity(_DIMS, width=cfg.width, depth=cfg.depth, time_features=cfg.time_features)
    if method == "nsf":
        return zuko.flows.NSF(
            _DIMS, transforms=cfg.nsf_transforms, hidden_features=(cfg.width,) * cfg.depth, bins=cfg.nsf_bins
        )
    raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")


def training_loss(method: str, cfg: ToyConfig) -> Callable[[nn.Module, Tensor, torch.Generator], Tensor]:
    """``loss(model, x0, generator)`` of ``method``, a float32 scalar per dimension (nats/dim for NLLs)."""
    if method in ("ntm", "gaussian"):
        # t_min fixed (not drawn per example) so that training matches the ELBO's grid exactly.
        nll = TrajectoryNLL(steps=cfg.steps, t_min=(cfg.t_min, cfg.t_min), shift=cfg.shift, cond_drop=0.0)
        return lambda model, x0, g: nll(model, x0, generator=g)
    if method == "fm":
        fm = FlowMatchingLoss(cond_drop=0.0)
        return lambda model, x0, g: fm(model, x0, generator=g)
    if method == "nsf":
        return lambda model, x0, g: -model().log_prob(x0).mean() / _DIMS
    raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")


# ============================================================================================== training
@dataclass
class TrainRecord:
    """What training one method did: optimizer steps, seconds (this run plus resumed ones), final loss."""

    iters: int
    seconds: float
    loss: float
    resumed_from: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)


def _lr_factor(progress: float, cfg: ToyConfig) -> float:
    """Linear warmup to 1 over ``cfg.warmup`` of the budget, then a half cosine down to ``min_lr_ratio``.

    ``progress`` is the fraction of the budget used, in steps or in seconds, so the same schedule serves
    both kinds of budget.
    """
    if progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    rest = min(1.0, (progress - cfg.warmup) / max(1.0 - cfg.warmup, 1e-9))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * rest))


def _checkpoint_path(out_dir: Path, method: str) -> Path:
    return out_dir / "checkpoints" / f"{method}.pt"


def train_method(
    method: str,
    cfg: ToyConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
) -> tuple[nn.Module, TrainRecord]:
    """Train one method on a fresh stream of ``cfg.density`` samples for ``cfg``'s budget.

    The stream is seeded by ``cfg.seed`` alone, so every method sees the same data points in the same order.
    With ``out_dir``, a checkpoint ``out_dir/checkpoints/<method>.pt`` (``torch.save`` of the model, EMA and
    optimizer states, the step, the seconds spent and the data stream's state) is written atomically every
    ``cfg.checkpoint_seconds`` and at the end; ``resume=True`` continues from it (a finished checkpoint
    is loaded as is, without training).

    Returns:
        The trained model, with the EMA weights swapped in when ``cfg.ema_decay > 0``, in eval mode, and
        a :class:`TrainRecord`.
    """
    device = torch.device(cfg.device)
    model = (model if model is not None else build_model(method, cfg)).to(device)
    loss_fn = training_loss(method, cfg)
    density = toy_density(cfg.density)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # Data are drawn on the CPU (the samplers are cheap) so that the stream does not depend on the device.
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    step, spent, resumed_from = 0, 0.0, 0
    history: list[tuple[int, float]] = []
    ckpt = _checkpoint_path(Path(out_dir), method) if out_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        state = load_torch(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"], {"num_updates": str(state["ema_updates"])})
        data_gen.set_state(state["data_generator"])
        noise_gen.set_state(state["noise_generator"])
        step, spent = int(state["step"]), float(state["seconds"])
        resumed_from = step
        history = [(int(i), float(v)) for i, v in state["history"]]

    def save() -> None:
        if ckpt is None:
            return
        save_torch(
            ckpt,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else {},
                "ema_updates": ema.num_updates if ema is not None else 0,
                "step": step,
                "seconds": spent,
                "data_generator": data_gen.get_state(),
                "noise_generator": noise_gen.get_state(),
                # (step, mean loss of the last 50 steps) pairs, so that a resumed run reports its loss too.
                "history": [list(h) for h in history],
            },
        )

    def progress() -> float:
        return step / cfg.iters if cfg.iters is not None else spent / float(cfg.seconds)

    bar = tqdm(
        total=cfg.iters if cfg.iters is not None else round(float(cfg.seconds)),
        initial=step if cfg.iters is not None else min(round(spent), round(float(cfg.seconds))),
        desc=f"{cfg.density} {method}",
        unit="it" if cfg.iters is not None else "s",
        # In seconds mode the bar counts seconds; tqdm's default rate would read "s/s".
        bar_format=None if cfg.iters is not None else "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s{postfix}",
        disable=not cfg.progress,
        dynamic_ncols=True,
        leave=True,
    )
    model.train()
    # The loss is summed on the device and read every 50 steps: reading it every step would synchronise a GPU.
    last_loss = history[-1][1] if history else float("nan")
    last_save, window, window_steps = time.perf_counter(), torch.zeros(()), 0
    while progress() < 1.0:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(progress(), cfg)
        x0 = density.sample(cfg.batch_size, generator=data_gen).to(device)
        loss = loss_fn(model, x0, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        window = window.to(loss.device) + loss.detach().float()
        window_steps += 1
        dt = time.perf_counter() - t0
        spent += dt
        if cfg.iters is not None:
            bar.update(1)
        elif round(spent) > bar.n:
            bar.update(min(round(spent), bar.total) - bar.n)
        if window_steps == 50 or progress() >= 1.0:
            last_loss = float(window) / window_steps
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"{method}: the training loss became {last_loss} by step {step}; lower lr")
            history.append((step, last_loss))
            window, window_steps = torch.zeros(()), 0
            bar.set_postfix(loss=f"{last_loss:.4f}", step=step, refresh=True)
        if time.perf_counter() - last_save > cfg.checkpoint_seconds:
            save()
            last_save = time.perf_counter()
    bar.close()
    save()
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return model, TrainRecord(step, spent, last_loss, resumed_from, history)


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


# ============================================================================================== evaluation
def _distances(samples: Tensor, test: Tensor) -> dict[str, float]:
    # The unbiased (U-statistic) energy distance estimates the population distance, so a model that matches
    # the data reads ~0 (+- sampling noise) instead of the O(1/n) floor of the V-statistic; that keeps
    # ratios between good models meaningful.
    return {
        "energy_distance": energy_distance(samples, test, unbiased=True),
        "sliced_wasserstein": sliced_wasserstein(samples, test, projections=256),
    }


@torch.no_grad()
def evaluate_method(
    method: str, model: nn.Module, cfg: ToyConfig, test: Tensor
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Likelihoods on ``test`` and sample distances to it for one trained method.

    Returns:
        ``(entries, samples)``: ``entries`` maps a label (``"ntm"``, ``"fm-euler-4"``, ...) to its metrics
        (``method``, ``steps`` and the numbers), ``samples`` maps the same labels to ``(sample_size, 2)``
        CPU samples; for NTM and the Gaussian-step model ``samples["<label>/trajectory"]`` holds the whole
        generated trajectories ``(sample_size, T + 1, 2)``, level 0 the cleanest.
    """
    device = torch.device(cfg.device)
    test_dev = test.to(device)
    n = cfg.sample_size
    reference = test[:n]  # the distances' reference: its own size sets their cost and their noise
    gen = torch.Generator(device).manual_seed(cfg.seed + _SEED_EVAL)
    entries: dict[str, dict[str, Any]] = {}
    samples: dict[str, Tensor] = {}
    if method in ("ntm", "gaussian"):
        grid = time_grid(cfg.steps, cfg.t_min, cfg.shift, device=device)
        dist = model.distribution(grid)
        elbo, traj_nll = [], []
        process = MarkovInterpolant()
        for chunk in test_dev.split(2000):
            elbo.append(dist.elbo(chunk, num_samples=cfg.elbo_samples, generator=gen))
            traj = process.sample(chunk, grid, generator=gen)
            traj_nll.append(-dist.log_prob(traj))
        torch.manual_seed(cfg.seed + _SEED_SAMPLE)  # the predictor chain draws from the global generator
        t0 = time.perf_counter()
        trajectory = dist.sample((n,))
        sample_seconds = time.perf_counter() - t0
        x = trajectory[:, 0].cpu()
        entries[method] = {
            "method": method,
            "steps": cfg.steps,
            # -ELBO / D: an upper bound on the NLL of the data, comparable with the NSF's exact NLL.
            "elbo_nats_per_dim": float(-torch.cat(elbo).mean()) / _DIMS,
            # -log p(x_{t_0}, ..., x_{t_T}) / ((T + 1) D) of forward trajectories of test points: the training
            # loss, on held-out data.
            "trajectory_nll_nats_per_dim": float(torch.cat(traj_nll).mean()) / ((cfg.steps + 1) * _DIMS),
            "sample_seconds": sample_seconds,
            **_distances(x, reference),
        }
        samples[method] = x
        samples[f"{method}/trajectory"] = trajectory.cpu()
    elif method == "fm":
        noise = torch.randn(n, _DIMS, generator=gen, device=device)
        for k in dict.fromkeys((cfg.steps, cfg.fm_steps_many)):
            t0 = time.perf_counter()
            x = euler_sample(model, noise, k, shift=cfg.shift).cpu()
            label = f"fm-euler-{k}"
            entries[label] = {
                "method": "fm-euler",
                "steps": k,
                "sample_seconds": time.perf_counter() - t0,
                **_distances(x, reference),
            }
            samples[label] = x
    elif method == "nsf":
        flow = model()
        nll = torch.cat([-flow.log_prob(chunk) for chunk in test_dev.split(2000)])
        torch.manual_seed(cfg.seed + _SEED_SAMPLE)
        t0 = time.perf_counter()
        x = flow.sample((n,)).cpu()
        entries[method] = {
            "method": "nsf",
            "steps": None,
            "nll_nats_per_dim": float(nll.mean()) / _DIMS,
            "sample_seconds": time.perf_counter() - t0,
            **_distances(x, reference),
        }
        samples[method] = x
    else:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    for entry in entries.values():
        entry["params"] = num_params(model)
    return entries, samples


# ============================================================================================== the job
@dataclass
class ToyResult:
    """What :func:`run_toy` returns: the ``metrics.json`` content, the samples and the trained models."""

    metrics: dict[str, Any]
    samples: dict[str, Tensor]
    models: dict[str, nn.Module]
    test: Tensor
    out_dir: Path | None


def _prepare_out_dir(cfg: ToyConfig, out_dir: Path, resume: bool) -> None:
    """Write ``config.json``, or on resume check that the saved one describes the same training."""
    path = out_dir / "config.json"
    if resume and path.is_file():
        check_config(cfg.to_dict(), load_json(path), ignore=RESUME_IGNORED, source=f"the run in {str(out_dir)!r}")
    elif not resume and (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").glob("*.pt")):
        # Never silently overwrite a run; say how to continue it instead.
        raise FileExistsError(
            f"out: {str(out_dir)!r} already holds checkpoints; pass --resume to continue that run, or choose "
            "another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(path, cfg.to_dict())


def run_toy(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False) -> ToyResult:
    """Train every method of ``cfg``, evaluate them, and (with ``out_dir``) write the figure and metrics.

    Files written to ``out_dir``: ``config.json``, ``checkpoints/<method>.pt``, ``metrics.json`` and
    ``toy_<density>.png`` (see :func:`plot_toy`).

    Arguments:
        cfg: The run.
        out_dir: Output folder, or ``None`` to keep everything in memory.
        resume: Continue from the checkpoints in ``out_dir`` (the config must describe the same training).

    Returns:
        A :class:`ToyResult`; ``result.metrics`` is what ``metrics.json`` holds.
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _prepare_out_dir(cfg, out, resume)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {cfg.device!r} was asked for but torch sees no CUDA device")
    previous_threads = torch.get_num_threads()
    threads = cfg.threads if cfg.threads is not None else auto_threads()
    torch.set_num_threads(threads)
    try:
        density = toy_density(cfg.density)
        test = density.sample(cfg.test_size, generator=torch.Generator().manual_seed(cfg.seed + _SEED_TEST))
        reference = density.sample(cfg.sample_size, generator=torch.Generator().manual_seed(cfg.seed + _SEED_REFERENCE))
        methods: dict[str, dict[str, Any]] = {}
        samples: dict[str, Tensor] = {"data": reference}
        models: dict[str, nn.Module] = {}
        for method in cfg.methods:
            model, record = train_method(method, cfg, out, resume=resume)
            t0 = time.perf_counter()
            entries, drawn = evaluate_method(method, model, cfg, test)
            eval_seconds = time.perf_counter() - t0
            for entry in entries.values():
                entry.update(
                    train_iters=record.iters,
                    train_seconds=record.seconds,
                    train_loss=record.loss,
                    eval_seconds=eval_seconds,
                )
            methods.update(entries)
            samples.update(drawn)
            models[method] = model
        metrics = {
            "density": cfg.density,
            "steps": cfg.steps,
            "budget": {"iters": cfg.iters} if cfg.iters is not None else {"seconds": cfg.seconds},
            "threads": threads,
            "device": str(device),
            # A second data sample against the test set: the noise level of the distances (what a perfect
            # sampler would score with these sample sizes).
            "reference": {"method": "data", "steps": None, **_distances(reference, test[: cfg.sample_size])},
            "methods": methods,
            "units": {
                "energy_distance": "unbiased energy distance to the held-out test set, data units (lower is better)",
                "sliced_wasserstein": "squared sliced Wasserstein-2 to the test set, 256 directions, squared data "
                "units (lower is better)",
                "elbo_nats_per_dim": "-ELBO / D on the test set: an upper bound on the NLL of the data (nats/dim)",
                "trajectory_nll_nats_per_dim": "-log p(x_t0..x_tT) / ((T + 1) D) of test trajectories (nats/dim)",
                "nll_nats_per_dim": "exact NLL of the test set (nats/dim)",
            },
            "config": cfg.to_dict(),
        }
        result = ToyResult(metrics, samples, models, test, out)
        if out is not None:
            save_json(out / "metrics.json", metrics)
            plot_toy(result, out / f"toy_{cfg.density}.png")
        return result
    finally:
        torch.set_num_threads(previous_threads)


# ============================================================================================== outputs
def plot_toy(result: ToyResult, path: str | os.PathLike, *, bins: int = 160, lim: float = 4.5) -> Path:
    """A PNG of 2-D histograms: the data and every method's samples (top row), and the NTM trajectory level
    by level from noise :math:`x_{t_T}` to :math:`x_{t_0}` (bottom row).

    Missing methods are skipped. Written atomically (to a temporary name, then ``os.replace``).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    metrics, samples = result.metrics, result.samples
    entries = metrics["methods"]
    top: list[tuple[str, Tensor]] = [("data (held out)", samples["data"])]
    fm = sorted((k for k in entries if k.startswith("fm-euler")), key=lambda k: entries[k]["steps"])
    order = ["ntm", *fm, "gaussian", "nsf"]
    names = {"ntm": "NTM", "gaussian": "Gaussian-step", "nsf": "single NSF"}
    for key in order:
        if key in samples:
            e = entries[key]
            steps = f", {e['steps']} steps" if e["steps"] else ""
            label = names.get(key, "FM Euler")
            top.append((f"{label}{steps}\nED {e['energy_distance']:.4f}", samples[key]))
    traj = samples.get("ntm/trajectory")
    cols = max(len(top), traj.shape[1] if traj is not None else 0)
    rows = 2 if traj is not None else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows + 0.3), squeeze=False)
    edges = torch.linspace(-lim, lim, bins + 1)

    def panel(ax, x: Tensor, title: str) -> None:
        ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=[edges.numpy(), edges.numpy()], cmap="magma")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")

    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes[0], top):
        ax.axis("on")
        panel(ax, x, title)
    if traj is not None:
        grid = time_grid(metrics["steps"], metrics["config"]["t_min"], metrics["config"]["shift"])
        for j, k in enumerate(range(traj.shape[1] - 1, -1, -1)):
            axes[1, j].axis("on")
            panel(axes[1, j], traj[:, k], f"NTM $x_{{t_{k}}}$, $t_{k}$ = {float(grid[k]):.2f}")
    fig.suptitle(
        f"{metrics['density']}: NTM vs baselines, same MLP, same budget ({_budget_text(metrics['budget'])})",
        fontsize=9,
    )
    fig.tight_layout(h_pad=1.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _budget_text(budget: dict[str, Any]) -> str:
    if "iters" in budget:
        return f"{budget['iters']} training steps each"
    return f"{budget['seconds']:g} training seconds each"


def metrics_to_rows(metrics: dict[str, Any], *, task: str | None = None, seed: int | None = None) -> list[dict]:
    """Flatten a ``metrics.json`` into rows of the benchmark results format (one metric per row).

    Every row has ``task``, ``method``, ``steps``, ``metric``, ``value`` and ``seed``, plus ``train_seconds``,
    ``train_iters``, ``params``, ``sample_seconds`` and the CPU ``threads``. The data-vs-data reference
    distances come out with ``method="data"``.
    """
    task = task or metrics["density"]
    seed = metrics["config"]["seed"] if seed is None else seed
    rows = []
    names = (
        "energy_distance",
        "sliced_wasserstein",
        "elbo_nats_per_dim",
        "trajectory_nll_nats_per_dim",
        "nll_nats_per_dim",
    )
    entries: Iterable[dict[str, Any]] = [metrics["reference"], *metrics["methods"].values()]
    for e in entries:
        extra = {k: e[k] for k in ("train_seconds", "train_iters", "params", "sample_seconds") if k in e}
        extra["threads"] = metrics["threads"]
        for name in names:
            if name in e:
                rows.append(
                    {
                        "task": task,
                        "method": e["method"],
                        "steps": e["steps"],
                        "metric": name,
                        "value": e[name],
                        "seed": seed,
                        **extra,
                    }
                )
    return rows
