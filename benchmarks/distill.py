r"""Initialisation from flow matching, trajectory score denoising and the learned denoiser, measured.

Three parts, all in one run (``benchmarks/results/distill.json``, table in ``docs/distill.md``):

(a) **FM initialisation vs from scratch** on a toy density (:func:`trajflow.data.toy.toy_density`). A
    flow-matching :class:`~trajflow.velocity.MLPVelocity` is pretrained; then, at the same training
    budget (iterations, batch, optimiser):

    * ``ntm-fm-init``: :func:`trajflow.finetune.init_from_flow_matching` (identity MAF transporter +
      :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around a copy of the velocity
      model) trained with :class:`~trajflow.finetune.FinetuneLoss` (λ = 2.5, cosine-decayed over the run);
      also reported at 0 iterations, where it *is* the FM model's Gaussian posterior sampler;
    * ``ntm-scratch``: the same transporter with an :class:`~trajflow.predictors.MLPPredictor` of the same
      width and depth, trained with :class:`~trajflow.TrajectoryNLL`.

    Metrics on held-out data: trajectory NLL (nats/dim, t_min = 0.02), ELBO of :math:`x_{t_0}` (nats/dim,
    t_min = 0.02), energy distance of 4-step samples to held-out data. Flow matching itself with Euler at 4 and
    100 steps is listed for reference (``fm-euler``).

(b) **Full vs fast sampling path** on 8x8 digits (a small image NTM: TarFlow-style transporter + transformer
    predictor, trained briefly; then a :class:`~trajflow.denoise.TransformerDenoiser` distilled from it).
    Throughput (images/s, on the **CPU** of this machine) of the full path (predictor x T, KV-cached inverse
    at every level, trajectory score denoising) and of the fast path (predictor x T, learned denoiser),
    their ratio, and the distance between the two paths' outputs *from the same latents* (mean squared
    difference, and the Fréchet distance on the features of a small digit classifier trained here).
    The paper's ~9x is a GPU figure for a 4B model; CPU ratios for a toy model are not comparable.

(c) **Sample quality with and without denoising** on the toy density: energy distance of the FM-initialised
    NTM's 4-step samples :math:`\hat x_{t_0}` as they are (``ntm-no-denoise``), divided by :math:`1 - t_0`
    only (``ntm-rescale-only``), after trajectory score denoising (``ntm-full``) and through a distilled
    :class:`~trajflow.denoise.MLPDenoiser` (``ntm-fast``).

Usage::

    python benchmarks/distill.py                 # the CPU configuration (about 10-15 min on 2 cores)
    python benchmarks/distill.py --config smoke --out /tmp/distill.json   # a seconds-long smoke test
    python benchmarks/distill.py --table benchmarks/results/distill.json  # the markdown table of a run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script

from _common import write_results  # noqa: E402

from trajflow import NTM, TrajectoryNLL, time_grid
from trajflow.baselines.flow_matching import FlowMatchingLoss, euler_sample
from trajflow.data.images import load_image_dataset
from trajflow.data.toy import toy_density
from trajflow.denoise import (
    DistillationLoss,
    MLPDenoiser,
    MLPDenoiserConfig,
    TransformerDenoiser,
    trajectory_score_denoise,
)
from trajflow.finetune import (
    FinetuneLoss,
    MeanAlignmentLoss,
    frozen_copy,
    identity_transporter,
    init_from_flow_matching,
)
from trajflow.metrics import energy_distance, frechet_distance
from trajflow.predictors import MLPPredictor
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.velocity import MLPVelocity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distill.json"


@dataclass
class DistillBenchConfig:
    """Sizes and budgets of one run."""

    toy: str = "checkerboard"
    seeds: tuple[int, ...] = (0, 1, 2)  # toy part; the image part runs with the first seed only
    width: int = 128  # toy velocity / predictor / denoiser width
    depth: int = 3
    batch: int = 256
    lr: float = 1e-3
    fm_iters: int = 2000  # flow-matching pretraining
    ntm_iters: int = 1000  # the shared budget of ntm-fm-init and ntm-scratch
    eval_at: tuple[int, ...] = (100, 300)  # also evaluated at these iterations
    distill_iters: int = 500
    steps: int = 4
    t_min_sample: float = 0.02
    n_eval: int = 2000
    # (b) images
    img_iters: int = 400
    img_distill_iters: int = 200
    img_batch: int = 64
    img_width: int = 64
    img_depth: int = 3
    sample_batch: int = 64
    repeats: int = 5
    n_distance: int = 512  # images compared between the two paths


CONFIGS = {
    "cpu": DistillBenchConfig(),
    "smoke": DistillBenchConfig(
        seeds=(0,),
        eval_at=(10,),
        fm_iters=20,
        ntm_iters=20,
        distill_iters=10,
        n_eval=200,
        img_iters=5,
        img_distill_iters=3,
        sample_batch=8,
        repeats=1,
        n_distance=16,
        width=32,
        depth=1,
    ),
}


# -- helpers ------------------------------------------------------------------------------------------------------


def train(
    params: list[nn.Parameter],
    step_loss: Callable[[int], Tensor],
    iters: int,
    lr: float,
    name: str,
    checkpoints: dict[int, Callable[[int, float], None]] | None = None,
) -> float:
    """Adam with gradient clipping at 1; calls ``checkpoints[i](i, seconds)`` after iteration ``i``.

    Returns the training wall-clock seconds (evaluations excluded).
    """
    opt = torch.optim.Adam(params, lr=lr)
    spent = 0.0
    for i in range(iters):
        start = time.perf_counter()
        loss = step_loss(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        spent += time.perf_counter() - start
        if (i + 1) % max(1, iters // 5) == 0:
            print(f"  {name}: iter {i + 1}/{iters} loss {float(loss.detach()):.4f}", flush=True)
        if checkpoints and (i + 1) in checkpoints:
            checkpoints[i + 1](i + 1, spent)
    return spent


@torch.no_grad()
def eval_nll(model: NTM, data: Tensor, steps: int, t_min: float, seed: int) -> float:
    """Trajectory NLL (nats/dim) of held-out data at a fixed t_min, averaged over the data."""
    g = torch.Generator().manual_seed(seed)
    loss = TrajectoryNLL(steps=steps, t_min=(t_min, t_min), cond_drop=0.0)
    return float(torch.cat([loss.per_example(model, x, generator=g) for x in data.split(1000)]).mean())


@torch.no_grad()
def eval_elbo(model: NTM, data: Tensor, steps: int, t_min: float, seed: int) -> float:
    r"""ELBO (nats/dim) of :math:`x_{t_0} = (1 - t_{\min}) x_0 + t_{\min} \epsilon` for held-out :math:`x_0`.

    At :math:`t_{\min} = 0` the FM-initialised predictor's last step has :math:`C = 0` (floored at
    ``c_min``), so both models are compared on the slightly noised data they are sampled at.
    """
    g = torch.Generator().manual_seed(seed)
    x_t0 = (1 - t_min) * data + t_min * torch.randn(data.shape, generator=g)
    dist = model.distribution(time_grid(steps, t_min))
    dims = data.shape[1:].numel()
    return float(torch.cat([dist.elbo(x, generator=g) for x in x_t0.split(1000)]).mean()) / dims


def row(task: str, method: str, steps: int | None, metric: str, value: float, seed: int, **extra) -> dict:
    return {"task": task, "method": method, "steps": steps, "metric": metric, "value": value, "seed": seed, **extra}


# -- (a) and (c): toy density --------------------------------------------------------------------------------------


def toy_part(cfg: DistillBenchConfig, seed: int) -> list[dict]:
    rows: list[dict] = []
    task, T = cfg.toy, cfg.steps
    density = toy_density(task)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    test = density.sample(cfg.n_eval, generator=torch.Generator().manual_seed(10_000 + seed))

    def batch() -> Tensor:
        return density.sample(cfg.batch, generator=g)

    # Flow-matching pretraining.
    velocity = MLPVelocity(2, width=cfg.width, depth=cfg.depth)
    fm = FlowMatchingLoss(cond_drop=0.0)
    secs = train(list(velocity.parameters()), lambda i: fm(velocity, batch()), cfg.fm_iters, cfg.lr, "fm")
    velocity.eval()
    for n in (T, 100):
        x = euler_sample(velocity, torch.randn(cfg.n_eval, 2), n)
        rows.append(
            row(task, "fm-euler", n, "energy_distance", energy_distance(x, test), seed, train_iters=cfg.fm_iters)
        )

    # The FM-initialised NTMs (mean pinned to the FM posterior, or with a learned residual on it) and the
    # from-scratch NTM, evaluated along the way at the same iterations.
    nll_train = TrajectoryNLL(steps=T, t_min=(0.0, 0.05), cond_drop=0.0)
    fm_init, reference = init_from_flow_matching(copy.deepcopy(velocity), transporter_kwargs={"transforms": 3})
    fm_dmu, reference_dmu = init_from_flow_matching(
        copy.deepcopy(velocity), transporter_kwargs={"transforms": 3}, delta_mean=True
    )
    scratch = NTM(identity_transporter(2, transforms=3), MLPPredictor(2, width=cfg.width, depth=cfg.depth))

    def evaluator(model: NTM, method: str) -> Callable[[int, float], None]:
        def evaluate(iters: int, train_s: float) -> None:
            extra = {
                "train_iters": iters,
                "fm_pretrain_iters": cfg.fm_iters if "fm" in method else 0,
                "train_seconds": round(train_s, 1),
            }
            model.eval()
            nll = eval_nll(model, test, T, cfg.t_min_sample, seed)
            elbo = eval_elbo(model, test, T, cfg.t_min_sample, seed)
            x = model.sample((cfg.n_eval,), steps=T, t_min=cfg.t_min_sample)
            rows.append(row(task, method, T, "nll_nats_per_dim", nll, seed, t_min=cfg.t_min_sample, **extra))
            rows.append(row(task, method, T, "elbo_nats_per_dim", elbo, seed, t_min=cfg.t_min_sample, **extra))
            rows.append(row(task, method, T, "energy_distance", energy_distance(x, test), seed, **extra))
            model.train()

        return evaluate

    marks = sorted({m for m in cfg.eval_at if m < cfg.ntm_iters} | {cfg.ntm_iters})
    evaluator(fm_init, "ntm-fm-init")(0, 0.0)
    for model, method, ref in ((fm_init, "ntm-fm-init", reference), (fm_dmu, "ntm-fm-init-dmu", reference_dmu)):
        ft_loss = FinetuneLoss(nll_train, MeanAlignmentLoss(ref), decay_steps=cfg.ntm_iters)
        train(
            list(model.parameters()),
            lambda i, model=model, ft_loss=ft_loss: ft_loss(model, batch(), step=i)[0],
            cfg.ntm_iters,
            cfg.lr,
            method,
            {m: evaluator(model, method) for m in marks},
        )
    train(
        list(scratch.parameters()),
        lambda i: nll_train(scratch, batch()),
        cfg.ntm_iters,
        cfg.lr,
        "ntm-scratch",
        {m: evaluator(scratch, "ntm-scratch") for m in marks},
    )

    # (c) denoising on the FM-initialised NTM: no denoising, score denoising, learned denoiser.
    teacher = frozen_copy(fm_init)
    denoiser = MLPDenoiser(MLPDenoiserConfig(features=2, width=cfg.width, depth=cfg.depth))
    d_loss = DistillationLoss(teacher, steps=T, t_min=(cfg.t_min_sample, cfg.t_min_sample), cond_drop=0.0)
    secs = train(list(denoiser.parameters()), lambda i: d_loss(denoiser, batch()), cfg.distill_iters, cfg.lr, "distill")
    denoiser.eval()
    grid = time_grid(T, cfg.t_min_sample)
    dist = teacher.distribution(grid)
    with torch.no_grad():
        latents, _ = dist.rsample_latents((cfg.n_eval,))
        traj = dist.decode(latents)
        u0 = latents[:, 0]
        fast = denoiser(u0, torch.full((cfg.n_eval,), cfg.t_min_sample))
    full = trajectory_score_denoise(dist, traj)
    raw = traj[:, 0]
    rescaled = raw / (1 - cfg.t_min_sample)  # undoes only the (1 - t_0) scaling of the mean, not the noise
    for method, x in (("ntm-no-denoise", raw), ("ntm-rescale-only", rescaled), ("ntm-full", full), ("ntm-fast", fast)):
        extra = {"model": "ntm-fm-init", "distill_iters": cfg.distill_iters if method == "ntm-fast" else 0}
        if method == "ntm-fast":
            extra["distill_seconds"] = round(secs, 1)
        rows.append(row(task, method, T, "energy_distance", energy_distance(x, test), seed, **extra))
    rows.append(row(task, "ntm-fast", T, "mean_squared_difference_to_full", float((fast - full).square().mean()), seed))
    rows.append(
        row(task, "ntm-full", T, "mean_abs_correction", float((full - raw / (1 - cfg.t_min_sample)).abs().mean()), seed)
    )
    return rows


# -- (b) images: throughput of the two paths ----------------------------------------------------------------------


class DigitFeatures(nn.Module):
    """A small MLP classifier of 8x8 digits; its penultimate layer gives the Fréchet features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32), nn.SiLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def image_part(cfg: DistillBenchConfig, seed: int) -> list[dict]:
    rows: list[dict] = []
    T, task = cfg.steps, "digits"
    torch.manual_seed(seed)
    train_set = load_image_dataset("digits", "train")
    test_set = load_image_dataset("digits", "test")
    x_train = train_set.dequantize(generator=torch.Generator().manual_seed(seed))  # (N, 1, 8, 8) in [-1, 1]
    x_test = test_set.to_unit_range()
    g = torch.Generator().manual_seed(seed)

    def batch() -> Tensor:
        return x_train[torch.randint(len(x_train), (cfg.img_batch,), generator=g)]

    shape, p, w = (1, 8, 8), 2, cfg.img_width
    transporter = identity_transporter(shape, patch_size=p, width=w, heads=4, layers_per_block=2, blocks=2)
    pcfg = TransformerPredictorConfig(shape, patch_size=p, width=w, depth=cfg.img_depth, heads=4)
    model = NTM(transporter, TransformerPredictor(pcfg))
    nll = TrajectoryNLL(steps=T, t_min=(0.0, 0.05), cond_drop=0.0)
    secs = train(list(model.parameters()), lambda i: nll(model, batch()), cfg.img_iters, cfg.lr, "image ntm")
    teacher = frozen_copy(model)
    dcfg = replace(pcfg, depth=2)
    denoiser = TransformerDenoiser(dcfg)
    d_loss = DistillationLoss(teacher, steps=T, t_min=(cfg.t_min_sample, cfg.t_min_sample), cond_drop=0.0)
    dsecs = train(
        list(denoiser.parameters()), lambda i: d_loss(denoiser, batch()), cfg.img_distill_iters, cfg.lr, "image distill"
    )
    denoiser.eval()

    # Feature net for the Fréchet distance.
    feats = DigitFeatures()
    labels = train_set.labels
    opt = torch.optim.Adam(feats.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(len(x_train), (128,), generator=g)
        loss = nn.functional.cross_entropy(feats(x_train[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    feats.eval()
    with torch.no_grad():
        acc = float((feats(x_test).argmax(-1) == test_set.labels).float().mean())

    grid = time_grid(T, cfg.t_min_sample)
    dist = teacher.distribution(grid)
    n = cfg.sample_batch
    t0 = torch.full((n,), cfg.t_min_sample)

    def chain() -> Tensor:
        with torch.no_grad():
            return dist.rsample_latents((n,))[0]

    def full_path() -> Tensor:
        latents = chain()
        with torch.no_grad():
            traj = dist.decode(latents)
        return trajectory_score_denoise(dist, traj)

    def fast_path() -> Tensor:
        latents = chain()
        with torch.no_grad():
            return denoiser(latents[:, 0], t0)

    def interleaved_medians(fns: list[Callable[[], Tensor]]) -> list[float]:
        """Median wall-clock seconds of each function, the calls interleaved (the CPU is shared)."""
        for fn in fns:
            fn()  # warm-up
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(cfg.repeats):
            for fn, ts in zip(fns, times):
                start = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - start)
        return [statistics.median(ts) for ts in times]

    t_full, t_fast, t_chain = interleaved_medians([full_path, fast_path, chain])
    extra = {
        "batch": n,
        "params_ntm": sum(p.numel() for p in model.parameters()),
        "params_denoiser": sum(p.numel() for p in denoiser.parameters()),
        "train_iters": cfg.img_iters,
        "distill_iters": cfg.img_distill_iters,
        "train_seconds": round(secs, 1),
        "distill_seconds": round(dsecs, 1),
    }
    rows.append(row(task, "ntm-full", T, "sample_images_per_s", n / t_full, seed, **extra))
    rows.append(row(task, "ntm-fast", T, "sample_images_per_s", n / t_fast, seed, **extra))
    rows.append(row(task, "ntm-predictor-only", T, "sample_images_per_s", n / t_chain, seed, **extra))
    rows.append(row(task, "ntm-fast", T, "speedup", t_full / t_fast, seed, baseline="ntm-full", **extra))

    # The two paths from the same latents, and both against held-out data.
    outs_full, outs_fast = [], []
    for _ in range(max(1, cfg.n_distance // n)):
        latents = chain()
        with torch.no_grad():
            traj = dist.decode(latents)
            outs_fast.append(denoiser(latents[:, 0], t0))
        outs_full.append(trajectory_score_denoise(dist, traj))
    full, fast = torch.cat(outs_full), torch.cat(outs_fast)
    with torch.no_grad():
        f_full, f_fast, f_test = feats.body(full), feats.body(fast), feats.body(x_test)
    rows.append(row(task, "ntm-fast", T, "mean_squared_difference_to_full", float((fast - full).square().mean()), seed))
    fd_extra = {"features": "digit MLP classifier, 32-d penultimate layer", "classifier_test_accuracy": round(acc, 3)}
    rows.append(
        row(task, "ntm-fast", T, "frechet_distance_to_full", frechet_distance(f_fast, f_full), seed, **fd_extra)
    )
    rows.append(row(task, "ntm-full", T, "frechet_distance", frechet_distance(f_full, f_test), seed, **fd_extra))
    rows.append(row(task, "ntm-fast", T, "frechet_distance", frechet_distance(f_fast, f_test), seed, **fd_extra))
    return rows


def markdown_tables(result: dict) -> str:
    """Markdown tables of a results file: mean (± std over seeds where there are several) per row key."""
    groups: dict[tuple, list[float]] = {}
    for r in result["rows"]:
        key = (r["task"], r["method"], r["steps"], r.get("train_iters"), r["metric"])
        groups.setdefault(key, []).append(r["value"])
    lines = ["| task | method | T | train iters | metric | value | seeds |", "|---|---|---|---|---|---|---|"]
    for (task, method, steps, iters, metric), values in groups.items():
        mean = statistics.fmean(values)
        text = f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"
        it = "" if iters is None else str(iters)
        lines.append(f"| {task} | {method} | {steps} | {it} | {metric} | {text} | {len(values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--skip", choices=["toy", "images"], action="append", default=[])
    parser.add_argument("--table", type=Path, help="print the markdown table of an existing results file and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        result = json.loads(args.table.read_text())
        print(markdown_tables(result))
        return result
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    start = time.perf_counter()
    rows: list[dict] = []
    for seed in cfg.seeds:
        if "toy" not in args.skip:
            rows += toy_part(cfg, seed)
        if "images" not in args.skip and seed == cfg.seeds[0]:
            rows += image_part(cfg, seed)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    extra = {
        "threads": args.threads,
        "config": {**asdict(cfg), "name": args.config},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    result = write_results(args.out, "distill", rows, command=command, device="cpu", extra=extra)
    for r in rows:
        print(f"{r['task']:>12} {r['method']:>18} {str(r['steps']):>4} {r['metric']:>32} {r['value']:.4g}")
    print(f"wrote {args.out} in {result['wall_seconds']} s")
    return result


if __name__ == "__main__":
    main()
