r"""Train NTM and its baselines on a 2-D toy density, evaluate them, and write a figure and ``metrics.json``.

    python examples/toy/train.py --density checkerboard --out runs/checkerboard
    python examples/toy/train.py --density spirals --out runs/spirals --time-budget 30 --seed 1
    python examples/toy/train.py --density spirals --out runs/spirals --time-budget 30 --seed 1 --resume

One job trains, on the same data points and for the same number of optimizer steps (or the same wall-clock
seconds, see :class:`~examples.toy.config.ToyConfig`), each through :class:`trajflow.train.Trainer`:

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
(energy distance and sliced Wasserstein-2 to held-out data, and the total variation of a fine histogram
against the density's exact bin masses), and writes ``OUT/toy_<density>.png``, ``OUT/metrics.json``,
``OUT/config.json`` and one folder of resumable Trainer checkpoints per method, ``OUT/<method>/``.

This file reads top to bottom: one method through the Trainer (:func:`train_method`), the whole job
(:func:`run_toy`, which ``benchmarks/toy.py`` calls once per density and seed), then the command line. Beside
it: ``config.py`` (:class:`~examples.toy.config.ToyConfig`), ``model.py`` (each method's model and loss),
``data.py`` (the training points), ``evaluate.py`` (likelihoods and distances) and ``figure.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trajflow.checkpoint import check_config, check_renamed_fields, load_json, load_model_weights, save_json
from trajflow.data.toy import TOY_DENSITIES, toy_density
from trajflow.train import Trainer, TrainerConfig

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.toy.config import METHODS, RESUME_IGNORED, ToyConfig, auto_threads  # noqa: E402
from examples.toy.data import ToyTrainingSet, whole_batch  # noqa: E402
from examples.toy.evaluate import SEED_REFERENCE, SEED_TEST, distances, evaluate_method  # noqa: E402
from examples.toy.figure import plot_toy  # noqa: E402
from examples.toy.model import ToyObjective, build_model  # noqa: E402

__all__ = ["TrainRecord", "trainer_config", "train_method", "ToyResult", "run_toy", "main"]

#: With a time budget, the Trainer's ``max_steps`` is only a cap (and the scale of the warmup): the budget ends
#: the run long before.
SECONDS_MAX_STEPS = 10_000_000
#: Steps between log lines (and loss reads, which would synchronise a GPU every step).
LOG_EVERY = 50


@dataclass
class TrainRecord:
    """What training one method did.

    Attributes:
        step: Optimizer steps done in all.
        train_seconds: Training seconds of the Trainer's last session (all sessions with a ``time_budget``).
        loss: The last logged training loss.
        resumed_from: The step this session started from (0: a fresh run).
        checkpoint: The Trainer's last checkpoint folder (``None`` for a run kept in memory).
        history: The Trainer's log records of this session.
    """

    step: int
    train_seconds: float
    loss: float
    resumed_from: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def trainer_config(cfg: ToyConfig) -> TrainerConfig:
    """The :class:`~trajflow.train.TrainerConfig` of every method of ``cfg`` (see :class:`ToyConfig`).

    Example:
        >>> t = trainer_config(ToyConfig(max_steps=1200))
        >>> t.max_steps, t.warmup_steps, t.batch_size, t.betas
        (1200, 24, 512, (0.9, 0.99))
    """
    steps = cfg.max_steps if cfg.max_steps is not None else SECONDS_MAX_STEPS
    return TrainerConfig(
        max_steps=steps,
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
        time_budget=float(cfg.time_budget) if cfg.time_budget is not None else None,
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
        method: One of :data:`~examples.toy.config.METHODS`.
        cfg: The run.
        out_dir: The run's folder.
        resume: Continue from the method's newest checkpoint (bit-exact on the CPU with a ``max_steps`` budget);
            a finished method is loaded without training. The checkpoint's config must describe the same
            training (a ``ValueError`` names the fields that differ).
        model: Train this model instead of :func:`~examples.toy.model.build_model`'s.
        stop_at: Stop after this step (checkpointed) without changing the schedule, as an interruption would.

    Returns:
        The trained model with the EMA weights loaded when ``cfg.ema_decay > 0``, in eval mode, and a
        :class:`TrainRecord`.

    Example:
        >>> cfg = ToyConfig(max_steps=2, batch_size=16, width=8, depth=1, progress=False)
        >>> model, record = train_method("fm", cfg)
        >>> record.step, model.training
        (2, False)
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"toy-{method}-") as tmp:
            model, record = train_method(method, cfg, tmp, resume=False, model=model, stop_at=stop_at)
            return model, TrainRecord(record.step, record.train_seconds, record.loss, 0, None, record.history)

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
        saved, source = load_json(path), f"the run in {str(out_dir)!r}"
        check_renamed_fields(ToyConfig, saved, "config", source)  # a run written before 0.3.0
        check_config(cfg.to_dict(), saved, ignore=RESUME_IGNORED, source=source)
    elif not resume and (
        any(out_dir.glob("*/checkpoints/step-*")) or any(p.stat().st_size for p in out_dir.glob("*/log.jsonl"))
    ):
        # Never silently overwrite a run; say how to continue it instead.
        raise FileExistsError(
            f"out: {str(out_dir)!r} already holds a run (checkpoints or a training log); pass --resume to continue "
            "that run, or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(path, cfg.to_dict())


def run_toy(cfg: ToyConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False) -> ToyResult:
    """Train every method of ``cfg``, evaluate them, and (with ``out_dir``) write the figure and metrics.

    Files written to ``out_dir``: ``config.json``, ``metrics.json``, ``toy_<density>.png`` (see
    :func:`~examples.toy.figure.plot_toy`) and one folder per method, ``<method>/``, where the Trainer
    keeps its ``config.json``, ``log.jsonl`` and ``checkpoints/step-NNNNNNN/`` (see
    :func:`train_method`).

    Arguments:
        cfg: The run.
        out_dir: Output folder, or ``None`` to keep everything in memory.
        resume: Continue every method from its newest checkpoint in ``out_dir`` (the config must describe the
            same training, budget included; finished methods are loaded without training).

    Returns:
        A :class:`ToyResult`; ``result.metrics`` is what ``metrics.json`` holds.

    Example:
        >>> import tempfile
        >>> cfg = ToyConfig(max_steps=2, batch_size=64, test_size=200, sample_size=200, elbo_samples=1,
        ...                 fm_steps_many=8, progress=False)
        >>> result = run_toy(cfg, tempfile.mkdtemp())
        >>> sorted(result.metrics["methods"])
        ['fm-euler-4', 'fm-euler-8', 'gaussian', 'nsf', 'ntm']
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
        test = density.sample(cfg.test_size, generator=torch.Generator().manual_seed(cfg.seed + SEED_TEST))
        reference = density.sample(cfg.sample_size, generator=torch.Generator().manual_seed(cfg.seed + SEED_REFERENCE))
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
                    train_iters=record.step,
                    train_seconds=record.train_seconds,
                    train_loss=record.loss,
                    eval_seconds=eval_seconds,
                )
            methods.update(entries)
            samples.update(drawn)
            models[method] = model
        metrics = {
            "density": cfg.density,
            "steps": cfg.steps,
            "budget": {"max_steps": cfg.max_steps} if cfg.max_steps is not None else {"time_budget": cfg.time_budget},
            "threads": threads,
            "device": str(device),
            # A second data sample against the test set: the noise level of the distances (what a perfect
            # sampler would score with these sample sizes).
            "reference": {
                "method": "data",
                "steps": None,
                **distances(reference, test[: cfg.sample_size], cfg.density),
            },
            "methods": methods,
            "units": {
                "energy_distance": "unbiased energy distance to the held-out test set, data units (lower is better)",
                "sliced_wasserstein": "squared sliced Wasserstein-2 to the test set, 256 directions, squared data "
                "units (lower is better)",
                "histogram_tv": "total variation between a histogram of the samples (36 x 36 bins 0.25 wide on "
                "[-4.5, 4.5]^2, plus one cell outside) and the density's exact bin masses, 0 to 1 (lower is "
                "better; the reference's value is the sampling floor)",
                "support_share": "share of the samples inside the density's bounded support (checkerboard only; "
                "1 is perfect)",
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


# ====================================================================================== the command line
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: every option maps onto a :class:`ToyConfig` field (defaults from ``ToyConfig()``)."""
    defaults = ToyConfig()
    p = argparse.ArgumentParser(
        description=(
            "Train an NTM (zuko NSF transporter + MLP predictor, t_min = 0) and, on the same MLP, data and "
            "budget, flow matching (Euler at --steps and at many steps), the Gaussian-step model and a single "
            "NSF; then write OUT/toy_<density>.png, OUT/metrics.json, OUT/config.json and OUT/<method>/checkpoints/."
        ),
    )
    p.add_argument(
        "--density", default=defaults.density, choices=sorted(TOY_DENSITIES), help="toy density (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="trajectory steps T, and the few-step Euler budget (default: %(default)s)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help=f"optimizer steps per method, the same for every method (default: {defaults.max_steps})",
    )
    budget.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        help="wall-clock training seconds per method, instead of --max-steps",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of everything (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=defaults.threads,
        help="torch CPU threads, recorded in the run; results depend on it, so keep it on --resume "
        "(default: %(default)s)",
    )
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=defaults.test_size,
        help="held-out test points, and samples drawn per method, for the metrics (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help="comma-separated subset of %(default)s (default: all)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=defaults.checkpoint_every,
        help="optimizer steps between checkpoints of each method (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=positive_float,
        default=defaults.checkpoint_minutes,
        help="also checkpoint each method after this many minutes of wall-clock time (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def print_summary(metrics: dict[str, Any], out: str) -> None:
    """A small table of the metrics on stdout."""
    head = (
        f"{'method':<16}{'steps':>6}{'energy dist':>13}{'sliced W2^2':>13}{'hist TV':>9}{'in supp':>9}"
        f"{'-ELBO':>9}{'NLL':>9}{'train s':>9}"
    )
    print(head)
    rows = [("data (ref)", metrics["reference"]), *metrics["methods"].items()]
    for name, e in rows:
        steps = "-" if e.get("steps") is None else str(e["steps"])
        tv = f"{e['histogram_tv']:.3f}" if "histogram_tv" in e else "-"
        share = f"{e['support_share']:.3f}" if "support_share" in e else "-"
        elbo = f"{e['elbo_nats_per_dim']:.3f}" if "elbo_nats_per_dim" in e else "-"
        nll = f"{e['nll_nats_per_dim']:.3f}" if "nll_nats_per_dim" in e else "-"
        secs = f"{e['train_seconds']:.0f}" if "train_seconds" in e else "-"
        print(
            f"{name:<16}{steps:>6}{e['energy_distance']:>13.5f}{e['sliced_wasserstein']:>13.5f}{tv:>9}{share:>9}"
            f"{elbo:>9}{nll:>9}{secs:>9}"
        )
    print(
        "(hist TV: total variation of a fine histogram against the exact density, the data row is its noise "
        "floor; in supp: share inside the support; -ELBO and NLL in nats/dim)"
    )
    print(f"(wrote {out}/metrics.json and {out}/toy_{metrics['density']}.png)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job of the command line ``argv``; returns the exit status (argparse exits with 2 on bad
    arguments, and a bad config or an ``--out`` that already holds a run without ``--resume`` returns 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(
            f"argument --methods: expected a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}"
        )
    defaults = ToyConfig()
    max_steps = args.max_steps
    if max_steps is None and args.time_budget is None:
        max_steps = defaults.max_steps
    try:
        cfg = ToyConfig(
            density=args.density,
            steps=args.steps,
            max_steps=max_steps,
            time_budget=args.time_budget,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            checkpoint_every=args.checkpoint_every,
            checkpoint_minutes=args.checkpoint_minutes,
            methods=methods,
            test_size=args.eval_samples,
            sample_size=args.eval_samples,
            progress=not args.quiet,
        )
        result = run_toy(cfg, args.out, resume=args.resume)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(result.metrics, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
