"""The toy job: train every method of a :class:`ToyConfig`, evaluate them, write metrics and a figure."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint import check_config, load_json, save_json
from ...data.toy import toy_density
from .config import RESUME_IGNORED, ToyConfig, auto_threads
from .evaluate import SEED_REFERENCE, SEED_TEST, distances, evaluate_method
from .figure import plot_toy
from .train import train_method

__all__ = ["ToyResult", "run_toy", "metrics_to_rows"]


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
    :func:`~trajflow.recipes.toy.plot_toy`) and one folder per method, ``<method>/``, where the Trainer
    keeps its ``config.json``, ``log.jsonl`` and ``checkpoints/step-NNNNNNN/`` (see
    :func:`~trajflow.recipes.toy.train_method`).

    Arguments:
        cfg: The run.
        out_dir: Output folder, or ``None`` to keep everything in memory.
        resume: Continue every method from its newest checkpoint in ``out_dir`` (the config must describe the
            same training, budget included; finished methods are loaded without training).

    Returns:
        A :class:`ToyResult`; ``result.metrics`` is what ``metrics.json`` holds.

    Example:
        >>> import tempfile
        >>> cfg = ToyConfig(iters=2, batch_size=64, test_size=200, sample_size=200, elbo_samples=1,
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
        "histogram_tv",
        "support_share",
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
