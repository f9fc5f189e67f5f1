r"""Text-to-image: NTM at 4 steps against flow matching at 4 and 50 Euler steps, same backbone and budget.

For each task, both models are trained by :func:`trajflow.t2i.train_t2i` from the same config, differing only
in ``model.kind``: ``ntm`` (TarFlow-style transporter + transformer predictor, trajectory NLL, T = 4) and
``fm`` (a :class:`~trajflow.predictors.transformer.TransformerVelocity` with the predictor's width and depth,
flow-matching loss). Same data, text encoder (frozen MiniLM), batch size, steps, optimiser, schedule, EMA and
seed. Then, on held-out prompts (scene seeds the models never saw), with classifier-free guidance
``sample.guidance`` for both:

* ``compositional_score`` (shapes only): GenEval-style, read back by a classifier trained on the generator's
  ground truth (:mod:`trajflow.evaluation.compositional`); the same classifier's score of the real images of
  the prompts is reported as method ``real`` (the ceiling), with its held-out accuracy;
* ``frechet_distance``: between generated and real images of the same prompts, on features of a network
  trained here (shapes: the reader's per-cell features; emoji: a contrastive image-text network), so it only
  compares rows of this file;
* ``train_images_per_s``, ``sample_images_per_s`` (batch ``sample.batch_size``, guidance included) and
  ``peak_memory_gib`` (GPU: ``torch.cuda.max_memory_allocated`` of training; CPU: the training process's peak
  resident set size, measured in a child process, which includes the text encoder and the data).

Usage::

    python benchmarks/t2i.py --config cpu    # shapes 16 px, about 15 minutes on 2 shared CPU cores
    python benchmarks/t2i.py --config gpu    # shapes 32 px, emoji 32 and 64 px: >= 10 minutes per model on one GPU

Writes ``benchmarks/results/t2i.json`` and a sample grid per task (real / NTM 4 / FM 4 / FM 50) under
``docs/t2i/``. Runs (checkpoints) go to ``--work`` (default ``runs/bench-t2i``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script
from _common import RESULTS, ROOT, command_line, write_results  # noqa: E402

from trajflow.checkpoint import save_json  # noqa: E402
from trajflow.evaluation import (  # noqa: E402
    dataset_pairs,
    evaluate_shapes_model,
    evaluate_text_image_model,
    load_or_train_shapes_reader,
    load_or_train_text_image_features,
    shapes_prompts,
)
from trajflow.t2i import T2IConfig, apply_overrides, build_dataset, load_t2i, save_image_grid, train_t2i  # noqa: E402

CONFIGS = ROOT / "examples" / "t2i" / "configs"


@dataclass
class Task:
    """One benchmark task: a config file, overrides applied to both methods, and the evaluation size."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    n_prompts: int = 256


@dataclass
class BenchConfig:
    tasks: list[Task]
    methods: tuple[tuple[str, int], ...] = (("ntm", 4), ("fm", 4), ("fm", 50))  # (model kind, sampling steps)
    threads: int | None = None
    grid_prompts: int = 8


BENCH_CONFIGS: dict[str, BenchConfig] = {
    # ~15 minutes on 2 shared CPU cores: 3,000 steps of batch 32 for each method on 16 px shapes.
    "cpu": BenchConfig(
        tasks=[
            Task(
                "shapes-16px",
                "shapes_cpu_smoke.json",
                ["train.steps=3000", "train.warmup_steps=150", "train.checkpoint_every=3000", "sample.grid_prompts=0"],
                n_prompts=256,
            )
        ],
        threads=1,
    ),
    # One GPU; not run in the session that wrote this file (no GPU was available there).
    "gpu": BenchConfig(
        tasks=[
            Task("shapes-32px", "shapes_32_gpu.json", ["sample.grid_prompts=0"], n_prompts=1024),
            Task("emoji-32px", "emoji_32_gpu.json", ["sample.grid_prompts=0"], n_prompts=1024),
            Task("emoji-64px", "emoji_64_gpu.json", ["sample.grid_prompts=0"], n_prompts=1024),
        ],
    ),
}


def _train_child(config: dict[str, Any], out: str, threads: int | None, queue: Any) -> None:
    """Train in a child process so that its peak memory is its own (RSS is a per-process high-water mark)."""
    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_t2i(T2IConfig.from_dict(config), out)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: kB
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    queue.put(
        {
            "images_per_s": result.images_per_s,
            "train_seconds": result.train_seconds,
            "loss": result.loss,
            "step": result.step,
            "checkpoint": str(result.checkpoint),
            "peak_rss_gib": peak_rss,
            "peak_gpu_gib": peak_gpu,
        }
    )


def train(config: T2IConfig, out: Path, threads: int | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_child, args=(config.to_dict(), str(out), threads, queue))
    proc.start()
    info = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"training {config.name} failed (exit code {proc.exitcode})")
    return info


def run_task(
    task: Task, bench: BenchConfig, work: Path, device: str, seed: int, max_steps: int | None
) -> tuple[list, dict]:
    base = json.loads((CONFIGS / task.config).read_text())
    overrides = list(task.overrides) + [f"train.seed={seed}"]
    if max_steps is not None:
        overrides += [
            f"train.steps={max_steps}",
            f"train.warmup_steps={min(max_steps, 10)}",
            f"train.checkpoint_every={max_steps}",
        ]
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for kind in dict.fromkeys(k for k, _ in bench.methods):
        cfg = T2IConfig.from_dict(
            apply_overrides(base, overrides + [f"model.kind={json.dumps(kind)}", f"name=bench-{task.name}-{kind}"])
        )
        out = work / f"{task.name}-{kind}"
        if out.exists():  # a fresh run every time: stale checkpoints would be resumed otherwise
            import shutil

            shutil.rmtree(out)
        print(f"[{task.name}] training {kind}: {cfg.train.steps} steps x batch {cfg.train.batch_size}", flush=True)
        info = train(cfg, out, bench.threads)
        runs[kind] = load_t2i(info["checkpoint"], device=device)
        n_params = sum(p.numel() for p in runs[kind].model.parameters())
        details[kind] = {**info, "parameters": n_params, "config": cfg.to_dict()}
        method = "ntm" if kind == "ntm" else "fm-euler"
        common = {
            "task": task.name,
            "method": method,
            "seed": seed,
            "parameters": n_params,
            "train_steps": info["step"],
            "batch_size": cfg.train.batch_size,
            "train_seconds": round(info["train_seconds"], 1),
        }
        rows.append({**common, "steps": None, "metric": "train_images_per_s", "value": info["images_per_s"]})
        if info["peak_gpu_gib"] is not None:
            rows.append(
                {
                    **common,
                    "steps": None,
                    "metric": "peak_memory_gib",
                    "value": info["peak_gpu_gib"],
                    "memory": "torch.cuda.max_memory_allocated, training",
                }
            )
        else:
            rows.append(
                {
                    **common,
                    "steps": None,
                    "metric": "peak_memory_gib",
                    "value": info["peak_rss_gib"],
                    "memory": "CPU: peak RSS of the training process (incl. MiniLM, data, Python)",
                }
            )
    first = next(iter(runs.values()))
    data = first.config.to_dict()["data"]
    grids: list[torch.Tensor] = []
    if data["name"] == "shapes":
        reader, report = load_or_train_shapes_reader(work / "evaluators", data, device=device, progress=True)
        details["reader"] = report
        ceiling = report["heldout_real_scores"]["compositional_score"]
        print(
            f"[{task.name}] reader: held-out cell accuracy {report['heldout_cell_accuracy']:.3f}, "
            f"real-image score {ceiling:.3f}"
        )
        captions, real, labels = shapes_prompts(data, task.n_prompts)
        rows.append(
            {
                "task": task.name,
                "method": "real",
                "steps": None,
                "metric": "compositional_score",
                "value": ceiling,
                "seed": seed,
                "note": "held-out real images read by the same classifier",
            }
        )
    else:
        dataset = build_dataset(first.config.data)
        key = {"data": data, "text": first.config.to_dict()["text"]}
        net, report = load_or_train_text_image_features(
            work / "evaluators", key, lambda: dataset_pairs(dataset, first.encoder)[:2], device=device, progress=True
        )
        details["features"] = report
        real, _, captions = dataset_pairs(dataset, first.encoder, task.n_prompts, seed=seed + 1)
    grids.append(real[: bench.grid_prompts])
    for kind, steps in bench.methods:
        bundle = runs[kind]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if data["name"] == "shapes":
            metrics, images, _ = evaluate_shapes_model(
                bundle, reader, n_prompts=task.n_prompts, steps=steps, seed=seed, progress=True
            )
            names = ["compositional_score", "frechet_distance", "sample_images_per_s"]
        else:
            metrics, images = evaluate_text_image_model(
                bundle, net, real, captions, steps=steps, seed=seed, progress=True
            )
            names = ["frechet_distance", "alignment", "sample_images_per_s"]
        method = "ntm" if kind == "ntm" else "fm-euler"
        details[f"{kind}-{steps}"] = metrics
        extra = {
            "guidance": bundle.config.sample.guidance,
            "n_prompts": task.n_prompts,
            "sample_batch_size": bundle.config.sample.batch_size,
        }
        for name in names:
            rows.append(
                {
                    "task": task.name,
                    "method": method,
                    "steps": steps,
                    "metric": name,
                    "value": metrics[name],
                    "seed": seed,
                    **extra,
                }
            )
        if torch.cuda.is_available():
            rows.append(
                {
                    "task": task.name,
                    "method": method,
                    "steps": steps,
                    "metric": "peak_memory_gib",
                    "value": torch.cuda.max_memory_allocated() / 2**30,
                    "seed": seed,
                    "memory": "torch.cuda.max_memory_allocated, sampling",
                    **extra,
                }
            )
        print(f"[{task.name}] {method} {steps} steps: " + ", ".join(f"{n} {metrics[n]:.4g}" for n in names), flush=True)
        grids.append(images[: bench.grid_prompts])
    grid_path = ROOT / "docs" / "t2i" / f"{task.name}-samples.png"
    save_image_grid(torch.cat(grids), grid_path, nrow=bench.grid_prompts)
    (grid_path.with_suffix(".txt")).write_text(
        "rows: real, "
        + ", ".join(f"{k} {s} steps" for k, s in bench.methods)
        + "\ncolumns:\n"
        + "\n".join(captions[: bench.grid_prompts])
        + "\n"
    )
    details["grid"] = str(grid_path.relative_to(ROOT))
    return rows, details


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(BENCH_CONFIGS), default="cpu")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-t2i"), help="folder for the training runs")
    p.add_argument("--out", default=str(RESULTS / "t2i.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap training steps (smoke tests of this script)")
    p.add_argument("--n-prompts", type=int, default=None, help="override the number of evaluation prompts")
    args = p.parse_args(argv)
    bench = BENCH_CONFIGS[args.config]
    if bench.threads:
        torch.set_num_threads(bench.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.config == "gpu" and device != "cuda":
        print("warning: --config gpu on a machine without CUDA; this will be very slow", file=sys.stderr)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, details = [], {}
    for task in bench.tasks:
        if args.n_prompts:
            task.n_prompts = args.n_prompts
        r, d = run_task(task, bench, work, device, args.seed, args.max_steps)
        rows += r
        details[task.name] = d
    wall = time.perf_counter() - t0
    extra = {
        "config": args.config,
        "wall_seconds": round(wall, 1),
        "budget": "same data, batch size, steps, optimiser, schedule, EMA and seed for NTM and flow matching",
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    write_results(args.out, "t2i", rows, command=command_line(), device=device, extra=extra)
    save_json(work / "details.json", details)
    print(f"results: {args.out} ({wall / 60:.1f} min); details: {work / 'details.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
