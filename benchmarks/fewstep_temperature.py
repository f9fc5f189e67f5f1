"""The few-step NTM at a lower sampling temperature: every step's scale times tau, tau chosen on training images.

For the few-step benchmark's finished NTM runs (``benchmarks/fewstep.py``: the main rows, or the runs of
``--variant``) and for the NTM at its initialisation (the teacher's posterior sampler, under ``RECIPE``), draws
``final_samples`` images at each temperature of ``TEMPERATURES``
(:class:`~trajflow.TrajectoryDistribution`'s ``temperature``: :math:`\\sigma_P \\to \\tau \\sigma_P` at every step,
the prior untempered) with two samplers:

* ``raw``: :meth:`trajflow.NTM.sample` to ``T_MIN``;
* ``learned-denoiser``: :func:`trajflow.denoise.fast_sample` with the run's learned denoiser, where its stage ran.

Each draw uses the benchmark's end-point noise (``gen(model, 20_000 + seed)``), so tau = 1 is the benchmark's own
row: its FD is recorded beside the run's (``reproduces``). Every draw is read twice: FD, KID, precision and recall
against the benchmark's 5,000 test images (the reported numbers), and FD against 5,000 training images
(``reference: "train"``), on which tau is chosen (``chosen`` rows: the tau of the lowest mean training-image FD
over the seeds, and the test figures at it). The test images never choose.

No training. The baselines have no such knob: flow matching, progressive distillation and MeanFlow sample by
deterministic steps.

Usage::

    python benchmarks/fewstep_temperature.py --config cpu --work runs/fewstep-cpu
    python benchmarks/fewstep_temperature.py --config cpu-fashion --work runs/fewstep-cpu-fashion
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewstep  # noqa: E402
from _common import RESULTS, ROOT, command_line, source_state, write_results  # noqa: E402
from fewstep_reader import SampleMetrics  # noqa: E402

from trajflow.checkpoint import load_model_weights, resolve_checkpoint  # noqa: E402
from trajflow.denoise import TransformerDenoiser, fast_sample  # noqa: E402
from trajflow.likelihood import dequantize  # noqa: E402

TEMPERATURES = (0.85, 1.0, 1.15, 1.3, 1.5)


def training_reference(cfg: fewstep.FewStepConfig, train: Any) -> torch.Tensor:
    """``real_samples`` dequantized training images (a fixed draw): the reference that chooses tau."""
    g = torch.Generator().manual_seed(4321)
    order = torch.randperm(len(train), generator=g)[: cfg.real_samples]
    return dequantize(train.images[order], 256, g)


def load_runs(
    cfg: fewstep.FewStepConfig, state: dict[str, Any], work: Path, variant: str | None, seeds: tuple[int, ...]
) -> list[tuple[str, int, Any, Any, dict[str, Any]]]:
    """``(tag, seed, ntm, denoiser or None, record)`` of each finished run, with its EMA weights, frozen."""
    out = []
    for rec in fewstep.finished_runs(work, cfg, methods=("ntm-fm",), seeds=seeds, variant=variant):
        torch.manual_seed(rec["seed"])
        ntm = fewstep.build_row("ntm-fm", state["teacher"], cfg, rec["recipe"]).model
        load_model_weights(resolve_checkpoint(work / "train" / rec["tag"]), ntm, ema=True)
        denoiser = None
        if (work / "denoisers" / rec["tag"]).is_dir():
            denoiser = TransformerDenoiser(fewstep.teacher_config(cfg))
            load_model_weights(resolve_checkpoint(work / "denoisers" / rec["tag"]), denoiser, ema=True)
            denoiser.eval().requires_grad_(False)
        out.append((rec["tag"], rec["seed"], ntm.eval().requires_grad_(False), denoiser, rec))
    return out


def draw(
    cfg: fewstep.FewStepConfig, ntm: Any, denoiser: Any, sampler: str, seed: int, temperature: float
) -> torch.Tensor:
    """``final_samples`` images of ``sampler`` at ``temperature`` on the benchmark's end-point noise of ``seed``."""
    n = cfg.final_samples
    y = fewstep.labels(cfg, n, ntm.device)
    kw = {"cond": y, "steps": 4, "t_min": fewstep.T_MIN, "guidance": cfg.guidance, "temperature": temperature}
    g = fewstep.gen(ntm, 20_000 + seed)
    shape = (n,) if y is None else ()
    if sampler == "raw":
        return ntm.sample(shape, generator=g, **kw).cpu()
    return fast_sample(ntm, denoiser, shape, generator=g, **kw).cpu()


def recorded_fd(rec: dict[str, Any] | None, work: Path, sampler: str) -> float | None:
    """The benchmark's own FD of this run and sampler (tau = 1), or ``None`` (the init has no run record)."""
    if rec is None:
        return None
    if sampler == "raw":
        return rec["final"]["raw"]["frechet_distance"]
    return json.loads((work / "denoisers" / f"{rec['tag']}.json").read_text())["final"]["frechet_distance"]


def seed_stats(
    rows: list[dict[str, Any]], init: bool, sampler: str, metric: str, reference: str, tau: float
) -> tuple[float, float, list[int]] | None:
    """Mean, sample std (0 for one seed) and seeds of the per-seed rows of one (run kind, sampler, metric,
    reference, tau); ``None`` where there are none."""
    hits = [
        r
        for r in rows
        if not r.get("chosen")
        and (r["run"] == "init") == init
        and (r["variant"], r["metric"], r["reference"], r["temperature"]) == (sampler, metric, reference, tau)
    ]
    if not hits:
        return None
    t = torch.tensor([r["value"] for r in hits], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(hits) > 1 else 0.0, sorted(r["seed"] for r in hits)


def chosen_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (run kind, sampler): the tau of the lowest mean training-image FD, and the test figures at it."""
    out = []
    for init, sampler in sorted({(r["run"] == "init", r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["run"] == "init") == init and r["variant"] == sampler]
        taus = sorted({r["temperature"] for r in mine})
        best = min(taus, key=lambda tau: seed_stats(rows, init, sampler, "frechet_distance", "train", tau)[0])
        for metric in ("frechet_distance", "kid", "precision", "recall"):
            value, std, seeds = seed_stats(rows, init, sampler, metric, "test", best)
            out.append(
                {
                    **{k: mine[0][k] for k in ("task", "method", "variant", "steps", "run_variant")},
                    "run": "init" if init else "trained",
                    "metric": metric,
                    "reference": "test",
                    "temperature": best,
                    "chosen": True,
                    "value": value,
                    "std": std,
                    "at_temperature_1": seed_stats(rows, init, sampler, metric, "test", 1.0)[0],
                    "seed": "mean",
                    "seeds": seeds,
                }
            )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of test and training-image FD per temperature (mean ± std over seeds)."""
    lines = [
        "| tau | init raw | raw | learned denoiser | raw, train-image FD | learned denoiser, train-image FD |",
        "|---|---|---|---|---|---|",
    ]

    def cell(init: bool, sampler: str, reference: str, tau: float) -> str:
        stats = seed_stats(rows, init, sampler, "frechet_distance", reference, tau)
        if stats is None:
            return "-"
        mean, std, seeds = stats
        return f"{mean:.1f}" + (f" ± {std:.1f}" if len(seeds) > 1 else "")

    for tau in sorted({r["temperature"] for r in rows}):
        lines.append(
            f"| {tau} | {cell(True, 'raw', 'test', tau)} | {cell(False, 'raw', 'test', tau)} | "
            f"{cell(False, 'learned-denoiser', 'test', tau)} | {cell(False, 'raw', 'train', tau)} | "
            f"{cell(False, 'learned-denoiser', 'train', tau)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu", choices=sorted(fewstep.CONFIGS))
    ap.add_argument("--work", type=Path, required=True, help="the few-step benchmark's work folder (its cache)")
    ap.add_argument("--variant", default=None, help="the runs of this recipe variant (default: the main rows)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--temperatures", type=float, nargs="*", default=list(TEMPERATURES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-docs", action="store_true", help="do not write the table and grid into docs/")
    args = ap.parse_args(argv)
    if 1.0 not in args.temperatures:
        raise ValueError(f"--temperatures: expected 1.0 among them (the benchmark's row), got {args.temperatures}")
    source = source_state()
    cfg = fewstep.CONFIGS[args.config]
    state = fewstep.prepare(cfg, args.work)  # sets the config's torch threads
    train_metrics = SampleMetrics(state["reader"], training_reference(cfg, state["train"]))
    runs = load_runs(cfg, state, args.work, args.variant, tuple(args.seeds or cfg.seeds))
    if not runs:
        raise ValueError(f"--work: no finished ntm-fm run of variant {args.variant!r} under {args.work}")
    init = fewstep.build_row("ntm-fm", state["teacher"], cfg, fewstep.RECIPE).model.eval().requires_grad_(False)
    base = {"task": cfg.dataset, "method": "ntm-fm", "steps": 4, "run_variant": args.variant}
    rows, grids = [], {}
    for tag, seed, ntm, denoiser, rec in [("init", 0, init, None, None), *runs]:
        for sampler in ("raw", "learned-denoiser") if denoiser is not None else ("raw",):
            for tau in args.temperatures:
                x = draw(cfg, ntm, denoiser, sampler, seed, tau)
                test = fewstep.read(state, cfg, x)
                common = {**base, "variant": sampler, "run": tag, "seed": seed, "temperature": tau}
                extra = {}
                if tau == 1.0 and rec is not None:
                    extra["reproduces"] = recorded_fd(rec, args.work, sampler)
                for metric in ("frechet_distance", "kid", "precision", "recall"):
                    rows.append({**common, "metric": metric, "reference": "test", "value": test[metric], **extra})
                fd_train = train_metrics.frechet_distance(x)
                rows.append({**common, "metric": "frechet_distance", "reference": "train", "value": fd_train})
                print(f"{tag} {sampler} tau {tau}: FD test {test['frechet_distance']:.1f} train {fd_train:.1f}")
                if seed == 0 and tag != "init":
                    grids[sampler, tau] = x[:16]
    rows += chosen_rows(rows)
    key = fewstep.results_key(dataclasses.asdict(cfg))  # the data set, and the teacher where not the transformer
    name = "fewstep_temperature" + ("" if key == "mnist" else f"-{key}")
    out = args.out or RESULTS / f"{name}.json"
    extra = {"config_name": args.config, "variant": args.variant, "temperatures": args.temperatures}
    write_results(out, "fewstep_temperature", rows, command=command_line(), source=source, device="cpu", extra=extra)
    print(table(rows))
    if not args.no_docs:
        docs = fewstep.DOCS if key == "mnist" else fewstep.DOCS / key
        for sampler in ("raw", "learned-denoiser"):
            picks = [grids[sampler, tau] for tau in args.temperatures if (sampler, tau) in grids]
            if picks:  # one row of 16 samples per temperature, seed 0, coldest first
                fewstep.save_grid(torch.cat(picks), docs / f"temperature-{sampler}.png", nrow=16)
        begin, end = (
            f"<!-- fewstep temperature {key}: begin -->",
            f"<!-- fewstep temperature {key}: end -->",
        )
        md = ROOT / "docs" / "fewstep.md"
        text = md.read_text()
        if begin in text:
            pre, rest = text.split(begin, 1)
            md.write_text(f"{pre}{begin}\n{table(rows)}\n{end}{rest.split(end, 1)[1]}")
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
