r"""Test-set bits/dim of an NTM against a single TarFlow-style flow and the Gaussian-step model, at equal time.

Methods, all trained by maximum likelihood on uniformly dequantised data in [-1, 1) by
:class:`trajflow.train.Trainer` (AdamW, warmup and cosine decay) for the **same wall-clock time** on the same
device (the ``equal-time`` budget): the NTM trains first (for ``time_budget`` seconds, or for ``max_steps``
optimizer steps when that is 0) and its measured seconds become the ``TrainerConfig.time_budget`` of every other
likelihood model of the same seed, whose learning-rate schedule then runs on elapsed time so that it
completes whatever its speed. Each row records ``train_seconds``, ``train_iters``, ``params`` and
``time_ratio`` (its seconds over the NTM's).

* ``ntm``: :class:`~trajflow.NTM` with T = 4, a :class:`TransformerTransporter` (shallow causal AR flow)
  and a :class:`TransformerPredictor`, trained with :class:`~trajflow.TrajectoryNLL` with :math:`t_{\min}`
  fixed at 0, so that :math:`x_{t_0}` *is* the dequantised image and the bound is about the data.
  Reported: the importance-weighted bound with ``iwae_samples`` = K trajectories per image
  (:func:`trajflow.likelihood.elbo_bits_per_dim` with ``bound="both"``), and the ELBO on the same draws.
* ``tarflow``: :class:`trajflow.baselines.SingleFlow`, one :class:`TransformerTransporter` with more blocks
  used alone as a flow at t = 0, its depth chosen by :func:`trajflow.baselines.matched_single_flow` to
  match the NTM's parameter count (within 10%). Reported: its exact dequantised bits/dim.
* ``gaussian``: :func:`trajflow.baselines.gaussian_step_model` (the identity transporter and the same
  predictor, T = 4), the "Gaussian bottleneck" NTM removes, trained like the NTM. Reported: IWAE and ELBO.
* ``pixel-categorical``: :class:`trajflow.baselines.PixelCategorical`, per-pixel histograms of the
  training set: an exact discrete bits/dim with no training (a floor).

Every trained method runs for each of the config's seeds (rows with an integer ``seed``); one more row
per method has ``seed: "mean"``, with ``value`` the mean over seeds, ``std`` the sample standard
deviation, ``min``/``max`` and ``seeds``. With seed 0 the script also trains a flow-matching velocity model
(:class:`TransformerVelocity`, the predictor's backbone) and writes 4-step sample grids (NTM,
Gaussian-step, flow matching with Euler) as PNGs. Each training run's log and final checkpoint are under
``--work``.

Usage::

    python benchmarks/bpd.py --config cpu                 # sklearn digits 8x8, 17 levels, ~18 min on one core
    python benchmarks/bpd.py --config gpu                 # MNIST and Fashion-MNIST 28x28, hours on one H100
    python benchmarks/bpd.py --smoke                      # every stage at tiny sizes, seconds; under runs/
    python benchmarks/bpd.py --split validation --seeds 0 --set ntm_mode=trajectory --out /tmp/v.json  # tuning

Bits/dim follow TarFlow's ``evaluate_bpd.py`` convention: :math:`-\log p / (D \ln 2) + \log_2(K / 2)` on
[-1, 1) (7 for 8-bit MNIST, :math:`\log_2 8.5` for the 17-level digits). See ``docs/bpd.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import trajflow
from trajflow.baselines import (
    FlowMatchingLoss,
    SingleFlow,
    SingleFlowNLL,
    euler_sample,
    gaussian_step_model,
    matched_single_flow,
    pixel_categorical_bits_per_dim,
)
from trajflow.data.images import ImageDataset, from_unit_range, load_image_dataset
from trajflow.likelihood import DequantizedObjective, elbo_bits_per_dim
from trajflow.nn import count_parameters
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.process import sequence_shift
from trajflow.train import Trainer, TrainerConfig, TrainResult
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig
from trajflow.velocity import TransformerVelocity

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script
from _common import RESULTS, ROOT, command_line, read_results, source_state, write_results  # noqa: E402

TRAJECTORY_MODELS = ("ntm", "gaussian")
# A time-budgeted run's `TrainerConfig.max_steps`: a cap no run reaches (the budget ends it) and the scale of its
# warmup, which is therefore the same share of the budget as `warmup / max_steps` is of a step budget.
TIMED_STEPS = 10**8


@dataclass
class BpdConfig:
    """One benchmark configuration: data, the shared model sizes and the (shared) training budget."""

    tasks: tuple[str, ...]
    patch_size: int
    width: int
    heads: int
    predictor_depth: int  # layers of the NTM / Gaussian-step predictor and of the velocity model
    transporter_blocks: int  # the NTM's transporter: a shallow AR flow (NTM uses 2 blocks)
    transporter_layers: int  # layers per transporter block
    batch_size: int
    max_steps: int
    lr: float
    warmup: int
    eval_samples: int  # dequantisation draws per test image
    eval_batch: int
    iwae_samples: int = 64  # K forward trajectories per dequantised image for the trajectory models
    iwae_dequantizations: int = 1  # their dequantisation draws per image (eval_samples is the flow's)
    seeds: tuple[int, ...] = (0, 1, 2)
    ntm_batch_size: int = 0  # > 0: the batch size of the NTM and the Gaussian-step model (tuned separately)
    ntm_lr: float = 0.0  # > 0: their peak learning rate
    time_budget: float = 0.0  # > 0: the NTM trains for this many seconds (else for `max_steps`); others as long
    ntm_mode: str = "trajectory"  # TrajectoryNLL mode of the NTM and Gaussian-step model: "trajectory" / "pair"
    val_images: int = 288  # images carved from train for --split validation (tuning never sees the test set)
    steps: int = 4
    shift: float = 1.0
    grid_size: int = 8  # the sample grids are grid_size x grid_size images
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    log_every: int = 50


CONFIGS: dict[str, BpdConfig] = {
    # 8x8 digits as 16 tokens of 2x2 patches; ~0.35M parameters per likelihood model. The NTM trains for
    # time_budget seconds of wall-clock time (pair mode, batch 32: tuned on the validation split, docs/bpd.md),
    # every other likelihood model for as long as the NTM of the same seed did. ~18 min on one core.
    "cpu": BpdConfig(
        tasks=("digits",),
        patch_size=2,
        width=64,
        heads=4,
        predictor_depth=4,
        transporter_blocks=2,
        transporter_layers=1,
        batch_size=32,
        max_steps=600,  # the warmup's share (50 / 600) and flow matching's steps
        lr=3e-3,
        warmup=50,
        eval_samples=4,
        eval_batch=355,
        iwae_samples=64,
        ntm_mode="pair",
        time_budget=80.0,
    ),
    # 28x28 as 196 tokens of 2x2 patches; ~45M parameters per likelihood model. Not run in this repository
    # yet: the budget (max_steps) is a plan for one H100, not a measured time.
    "gpu": BpdConfig(
        tasks=("mnist", "fashion-mnist"),
        patch_size=2,
        width=512,
        heads=8,
        predictor_depth=12,
        transporter_blocks=2,
        transporter_layers=2,
        batch_size=256,
        max_steps=60_000,
        lr=3e-4,
        warmup=2_000,
        eval_samples=4,
        eval_batch=500,
        shift=sequence_shift(196),
    ),
}

# --smoke: the options (and config fields) that shrink any config to seconds on a CPU, every stage kept.
SMOKE_OPTIONS: dict[str, Any] = {"max_steps": 2, "max_eval": 16}
SMOKE_FIELDS: dict[str, Any] = {
    "seeds": (0, 1),
    "batch_size": 4,
    "ntm_batch_size": 0,
    "eval_samples": 1,
    "iwae_samples": 2,
    "grid_size": 2,
    "log_every": 1,
}


# -- models ---------------------------------------------------------------------------------------------------


def predictor_config(cfg: BpdConfig, image_shape: tuple[int, int, int]) -> TransformerPredictorConfig:
    return TransformerPredictorConfig(
        image_shape, cfg.patch_size, width=cfg.width, depth=cfg.predictor_depth, heads=cfg.heads, validate_args=False
    )


def transporter_config(cfg: BpdConfig, image_shape: tuple[int, int, int]) -> TransformerTransporterConfig:
    return TransformerTransporterConfig(
        image_shape,
        cfg.patch_size,
        width=cfg.width,
        heads=cfg.heads,
        blocks=cfg.transporter_blocks,
        layers_per_block=cfg.transporter_layers,
        validate_args=False,
    )


def build_models(cfg: BpdConfig, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
    pc, tc = predictor_config(cfg, image_shape), transporter_config(cfg, image_shape)
    ntm = trajflow.NTM(TransformerTransporter(tc), TransformerPredictor(pc))
    return {
        "ntm": ntm,
        "tarflow": SingleFlow(TransformerTransporter(matched_single_flow(tc, count_parameters(ntm)))),
        "gaussian": gaussian_step_model(TransformerPredictor(pc)),
        "fm": TransformerVelocity(pc),
    }


# -- training and evaluation ----------------------------------------------------------------------------------


def objective(name: str, cfg: BpdConfig, levels: int) -> DequantizedObjective:
    """The per-dimension objective of each method (all are NLLs except flow matching's regression)."""
    if name in TRAJECTORY_MODELS:
        # t_min fixed at 0: the cleanest level is the dequantised image itself, so the model trained is the
        # one whose ELBO bounds the data likelihood (a t_min > 0 model would describe noised images).
        nll = trajflow.TrajectoryNLL(
            steps=cfg.steps, t_min=(0.0, 0.0), shift=cfg.shift, mode=cfg.ntm_mode, cond_drop=0.0
        )
        return DequantizedObjective(nll, levels, "nll_per_dim")
    if name == "tarflow":
        return DequantizedObjective(SingleFlowNLL(), levels, "nll_per_dim")
    if name == "fm":
        return DequantizedObjective(FlowMatchingLoss(cond_drop=0.0), levels, "fm_mse")
    raise ValueError(f"method: expected one of ntm, gaussian, tarflow, fm, got {name!r}")


def batch_size_of(name: str, cfg: BpdConfig) -> int:
    """The training batch size of ``name``: ``ntm_batch_size`` for the trajectory models if set."""
    return cfg.ntm_batch_size if name in TRAJECTORY_MODELS and cfg.ntm_batch_size > 0 else cfg.batch_size


def lr_of(name: str, cfg: BpdConfig) -> float:
    """The peak learning rate of ``name``: ``ntm_lr`` for the trajectory models if set."""
    return cfg.ntm_lr if name in TRAJECTORY_MODELS and cfg.ntm_lr > 0 else cfg.lr


def trainer_config(
    name: str, cfg: BpdConfig, seed: int, device: torch.device, *, max_steps: int | None, time_budget: float | None
) -> TrainerConfig:
    """``max_steps`` optimizer steps, or ``time_budget`` seconds of them; linear warmup over the first
    ``warmup / cfg.max_steps`` of the budget (at most 10%), then cosine decay to 1%; no EMA (the raw weights are
    evaluated)."""
    if (max_steps is None) == (time_budget is None):
        raise ValueError("trainer_config: give exactly one of max_steps and time_budget")
    steps = TIMED_STEPS if max_steps is None else max_steps
    warmup_share = min(cfg.warmup, max(1, cfg.max_steps // 10)) / cfg.max_steps
    return TrainerConfig(
        max_steps=steps,
        batch_size=batch_size_of(name, cfg),
        lr=lr_of(name, cfg),
        min_lr_ratio=0.01,
        warmup_steps=min(steps, round(warmup_share * steps)),
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
        grad_clip=cfg.grad_clip,
        ema_decay=0.0,
        seed=seed,
        log_every=cfg.log_every,
        checkpoint_every=steps,  # the final step only
        keep_checkpoints=1,
        progress=sys.stderr.isatty() and time_budget is None,  # a bar over TIMED_STEPS would say nothing
        cpu=device.type == "cpu",
        time_budget=time_budget,
    )


def train(
    name: str,
    model: nn.Module,
    train_set: ImageDataset,
    cfg: BpdConfig,
    seed: int,
    device: torch.device,
    run_dir: Path,
    *,
    max_steps: int | None = None,
    time_budget: float | None = None,
) -> TrainResult:
    """Train ``model`` afresh in ``run_dir`` for ``max_steps`` steps or ``time_budget`` seconds of them (the
    equal-time budget)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed or appended one
    trainer = Trainer(trainer_config(name, cfg, seed, device, max_steps=max_steps, time_budget=time_budget), run_dir)
    run_config = {"method": name, "task": train_set.name, "bpd": dataclasses.asdict(cfg)}
    return trainer.fit(model, objective(name, cfg, train_set.levels), train_set, run_config=run_config)


@torch.no_grad()
def evaluate(name: str, model: nn.Module, images: Tensor, levels: int, cfg: BpdConfig, seed: int) -> dict[str, float]:
    """Mean bits/dim of integer ``images``: the exact dequantised bpd of the flow (``{"exact": ...}``); the
    IWAE bound with ``cfg.iwae_samples`` trajectories and the ELBO on the same draws for the trajectory models
    (``{"iwae": ..., "elbo": ...}``), ``cfg.eval_batch`` images at a time."""
    model.eval()
    gen = torch.Generator(images.device).manual_seed(seed + 1)
    if name == "tarflow":
        bpd = model.bits_per_dim(images, levels, num_samples=cfg.eval_samples, batch_size=cfg.eval_batch, generator=gen)
        return {"exact": float(bpd.mean())}
    parts = [
        elbo_bits_per_dim(
            model,
            x,
            levels,
            steps=cfg.steps,
            num_samples=cfg.iwae_dequantizations,
            bound="both",
            num_trajectories=cfg.iwae_samples,
            shift=cfg.shift,
            generator=gen,
        )
        for x in images.split(cfg.eval_batch)
    ]
    return {k: float(torch.cat([p[k] for p in parts]).mean()) for k in parts[0]}


@torch.no_grad()
def sample_grid(name: str, model: nn.Module, cfg: BpdConfig, shape: tuple[int, int, int], seed: int) -> Tensor:
    """``grid_size^2`` samples in [-1, 1]: 4 predictor steps (NTM, Gaussian-step) or 4 Euler steps (FM)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed + 2)
    n = cfg.grid_size**2
    model.eval()
    if name in TRAJECTORY_MODELS:
        return model.sample((n,), steps=cfg.steps, shift=cfg.shift, generator=gen)
    noise = torch.randn(n, *shape, device=device, generator=gen)
    return euler_sample(model, noise, cfg.steps, shift=cfg.shift)


def save_grid(images: Tensor, levels: int, path: Path, nrow: int, scale: int) -> None:
    """Write ``(N, C, H, W)`` floats in [-1, 1] as one PNG, quantised to the data's levels, 1 px gutters."""
    from PIL import Image

    pixels = from_unit_range(images.float().cpu(), levels).float() * (255.0 / (levels - 1))
    n, c, h, w = pixels.shape
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255.0)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = pixels[i]
    array = canvas.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# -- results --------------------------------------------------------------------------------------------------

AGGREGATED = ("value", "elbo_bits_per_dim", "train_seconds", "train_iters", "seconds_per_iter", "time_ratio")


def aggregate(rows: list[dict]) -> list[dict]:
    """One ``seed: "mean"`` row per (task, method) over its per-seed rows: ``value`` is the mean over seeds,
    ``std`` the sample standard deviation (ddof 1), ``min``/``max`` the range, ``seeds`` the seeds; other
    numeric keys of :data:`AGGREGATED` are averaged too; the rest is copied from the first seed's row."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if isinstance(r["seed"], int):
            groups.setdefault((r["task"], r["method"]), []).append(r)
    out = []
    for group in groups.values():
        first = dict(group[0])
        values = [r["value"] for r in group]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        for key in AGGREGATED:
            if all(key in r and r[key] is not None for r in group):
                first[key] = round(sum(r[key] for r in group) / n, 5 if key != "train_iters" else 1)
        first.update(
            seed="mean",
            value=round(mean, 5),
            std=round(std, 5),
            min=round(min(values), 5),
            max=round(max(values), 5),
            n_seeds=n,
            seeds=[r["seed"] for r in group],
        )
        first.pop("final_train_loss_nats_per_dim", None)
        out.append(first)
    return out


def markdown_table(path: Path) -> str:
    """The docs table (``docs/bpd.md``) from a results JSON written by this script: the ``seed: "mean"`` rows."""
    payload = read_results(path)
    lines = [
        "| task | method | steps | test bits/dim (mean ± std, n seeds) | bound | ELBO bits/dim | params | "
        "train s | iters | time / NTM's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r["seed"] != "mean" and not (r["method"] == "pixel-categorical"):
            continue
        steps = "-" if r["steps"] is None else str(r["steps"])
        spread = f" ± {r['std']:.3f} ({r['n_seeds']})" if "std" in r else ""
        elbo = f"{r['elbo_bits_per_dim']:.3f}" if r.get("elbo_bits_per_dim") is not None else "-"
        iters = f"{r['train_iters']:.0f}" if r.get("train_iters") else "-"
        ratio = f"{r['time_ratio']:.2f}" if r.get("time_ratio") is not None else "-"
        lines.append(
            f"| {r['task']} | {r['method']} | {steps} | {r['value']:.3f}{spread} | {r.get('bound', '')} | {elbo} | "
            f"{r['params']:,} | {r['train_seconds']:.0f} | {iters} | {ratio} |"
        )
    commit = payload["commit"] + (" (+ uncommitted changes)" if payload.get("dirty") else "")
    lines.append("")
    lines.append(f"Measured on {payload['device']}, commit {commit}, {payload['created']}: `{payload['command']}`.")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------------


def split_data(task: str, split: str, cfg: BpdConfig, max_eval: int | None) -> tuple[ImageDataset, ImageDataset]:
    """``(train, evaluation)`` images: the official test split, or (``split="validation"``, for tuning) the
    last ``cfg.val_images`` of a fixed permutation of the training split, trained on the rest."""
    train_set = load_image_dataset(task, "train")
    if split == "test":
        eval_set = load_image_dataset(task, "test")
    else:
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1234))
        eval_set = train_set.select(perm[-cfg.val_images :].sort().values)
        train_set = train_set.select(perm[: -cfg.val_images].sort().values)
    if max_eval is not None:
        eval_set = eval_set.subset(max_eval)
    return train_set, eval_set


def pixel_categorical_row(task: str, train_set: ImageDataset, eval_set: ImageDataset, common: dict) -> dict:
    value = float(pixel_categorical_bits_per_dim(train_set.images, eval_set.images, train_set.levels).mean())
    print(f"  [pixel-categorical] bits/dim {value:.4f} (exact discrete, no training)")
    return {
        "task": task,
        "method": "pixel-categorical",
        "steps": None,
        "metric": "bits_per_dim",
        "value": round(value, 5),
        "seed": None,  # deterministic: no training, no sampling
        **common,
        "params": train_set.dim * (train_set.levels - 1),  # the histograms' free probabilities
        "train_seconds": 0.0,
        "dequantization": "none",
        "num_samples": 0,
        "bound": "exact",
        "budget": "none",
    }


def method_row(
    task: str, name: str, cfg: BpdConfig, seed: int, result: TrainResult, budget: float | None, scores: dict, **common
) -> dict:
    """One trained method's row: its bits/dim (IWAE for the trajectory models, exact for the flow) and budget."""
    flow = name == "tarflow"
    value, elbo = (scores["exact"], None) if flow else (scores["iwae"], scores["elbo"])
    seconds = result.train_seconds
    return {
        "task": task,
        "method": name,
        "steps": None if flow else cfg.steps,
        "metric": "bits_per_dim",
        "value": round(value, 5),
        "seed": seed,
        "budget": "equal-time" if budget is not None else "equal-iterations",
        "bound": "dequantized" if flow else f"iwae-{cfg.iwae_samples}+dequantized",
        "elbo_bits_per_dim": None if elbo is None else round(elbo, 5),
        **common,
        "train_seconds": round(seconds, 1),
        "train_iters": result.step,
        "seconds_per_iter": round(seconds / max(result.step, 1), 4),
        "time_ratio": None if budget is None else round(seconds / budget, 3),
        "reference": "ntm" if budget is not None else None,
        "train_mode": None if flow else cfg.ntm_mode,
        "batch_size": batch_size_of(name, cfg),
        "lr": lr_of(name, cfg),
        "dequantization": "uniform",
        "num_samples": cfg.eval_samples if flow else cfg.iwae_dequantizations,
        "num_trajectories": None if flow else cfg.iwae_samples,
        "final_train_loss_nats_per_dim": round(result.loss, 5),  # the last logging window's mean
    }


def run_task(task: str, cfg: BpdConfig, args: argparse.Namespace, device: torch.device) -> list[dict]:
    train_set, eval_set = split_data(task, args.split, cfg, args.max_eval)
    levels, shape = train_set.levels, train_set.image_shape
    eval_images = eval_set.images.to(device)
    max_steps = cfg.max_steps if args.max_steps is None else min(cfg.max_steps, args.max_steps)
    timed_ntm = cfg.time_budget > 0 and args.max_steps is None
    print(
        f"{task}: {len(train_set)} train / {len(eval_set)} {args.split} images {shape}, {levels} levels, "
        f"NTM {f'{cfg.time_budget:g} s' if timed_ntm else f'{max_steps} steps'} "
        f"({cfg.ntm_mode} mode), seeds {list(cfg.seeds)}"
    )
    common = {"split": args.split, "levels": levels, "test_images": len(eval_set)}
    rows = [pixel_categorical_row(task, train_set, eval_set, common)] if "pixel-categorical" in args.methods else []
    trained = [m for m in ("ntm", "tarflow", "gaussian") if m in args.methods]
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        models = {k: m.to(device) for k, m in build_models(cfg, shape).items() if k in args.methods}
        params = {k: count_parameters(m) for k, m in models.items()}
        print(f"  seed {seed}: parameters " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
        if "tarflow" in models and seed == cfg.seeds[0]:
            tf = models["tarflow"].transporter.config
            print(f"  tarflow: {tf.blocks} blocks x {tf.layers_per_block} layers, width {tf.width}")
        # the NTM's measured training seconds: the other methods' budget (the config's, without an NTM)
        budget: float | None = cfg.time_budget if cfg.time_budget > 0 and "ntm" not in trained else None
        for name in trained:
            model, run_dir = models[name], args.work / task / f"seed-{seed}" / name
            if name == "ntm" and timed_ntm:
                result = train(name, model, train_set, cfg, seed, device, run_dir, time_budget=cfg.time_budget)
            elif name == "ntm" or budget is None:
                result = train(name, model, train_set, cfg, seed, device, run_dir, max_steps=max_steps)
            else:
                result = train(name, model, train_set, cfg, seed, device, run_dir, time_budget=budget)
            if name == "ntm":
                budget = result.train_seconds
            print(
                f"  [{name}] trained {result.step} steps in {result.train_seconds:.0f} s, final loss {result.loss:.4f}",
                flush=True,
            )
            if seed == cfg.seeds[0] and name in TRAJECTORY_MODELS and not args.no_samples:
                path = args.samples_dir / f"{task}_{name}_{cfg.steps}step.png"
                save_grid(sample_grid(name, model, cfg, shape, seed), levels, path, cfg.grid_size, args.png_scale)
                print(f"  [{name}] samples -> {path}")
            start = time.perf_counter()
            scores = evaluate(name, model, eval_images, levels, cfg, seed)
            row = method_row(task, name, cfg, seed, result, budget, scores, **common, params=params[name])
            bound = "" if row["elbo_bits_per_dim"] is None else f" (IWAE-{cfg.iwae_samples}; ELBO {scores['elbo']:.4f})"
            print(
                f"  [{name}] {args.split} bits/dim {row['value']:.4f}{bound} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            rows.append(row)
        if "fm" in models and seed == cfg.seeds[0] and not args.no_samples:
            # flow matching has no likelihood here: it is the 4-step sample-quality baseline of the grids
            run_dir = args.work / task / f"seed-{seed}" / "fm"
            result = train("fm", models["fm"], train_set, cfg, seed, device, run_dir, max_steps=max_steps)
            path = args.samples_dir / f"{task}_fm_{cfg.steps}step.png"
            save_grid(sample_grid("fm", models["fm"], cfg, shape, seed), levels, path, cfg.grid_size, args.png_scale)
            print(f"  [fm] trained {result.step} steps in {result.train_seconds:.0f} s; samples -> {path}")
    return rows + aggregate(rows)


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` for a :class:`BpdConfig` field, the value parsed as the field's type."""
    key, sep, raw = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(BpdConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected key=value with key one of {sorted(fields)}, got {text!r}")
    current = getattr(CONFIGS["cpu"], key)
    if isinstance(current, tuple):
        return key, tuple(type(current[0])(v) for v in raw.split(","))
    return key, type(current)(raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--tasks", nargs="+", help="override the config's datasets")
    parser.add_argument("--methods", nargs="+", default=["pixel-categorical", "ntm", "tarflow", "gaussian", "fm"])
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="evaluate on the test split, or (tuning) on a validation split carved from train",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument(
        "--set",
        type=parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set ntm_mode=pair --set lr=3e-3 (tuning)",
    )
    parser.add_argument("--max-steps", type=int, help="cap max_steps, the NTM trained by steps (smoke tests)")
    parser.add_argument("--max-eval", type=int, help="evaluate on the first N images only (smoke tests)")
    parser.add_argument("--batch-size", type=int, help="override the training batch size (smoke tests)")
    parser.add_argument("--eval-samples", type=int, help="override the dequantisation draws per image (smoke tests)")
    parser.add_argument("--iwae-samples", type=int, help="override K, the IWAE trajectories per image")
    parser.add_argument("--grid-size", type=int, help="override the side of the sample grids (smoke tests)")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grids and flow matching")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a busy shared CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="every stage at tiny sizes, 2 seeds; under runs/")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/bpd.json)")
    parser.add_argument("--samples-dir", type=Path, help="sample grids (default: docs/bpd)")
    parser.add_argument("--work", type=Path, help="training runs' logs and checkpoints (default: runs/bpd)")
    parser.add_argument("--png-scale", type=int, help="PNG upscaling (default: 4 for 8x8 data, 2 otherwise)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if args.smoke:
        cfg = dataclasses.replace(cfg, **SMOKE_FIELDS)
        for key, value in SMOKE_OPTIONS.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    runs = ROOT / "runs" / ("bpd-smoke" if args.smoke else "bpd")
    args.out = args.out or (runs / "bpd.json" if args.smoke else RESULTS / "bpd.json")
    args.samples_dir = args.samples_dir or (runs / "samples" if args.smoke else ROOT / "docs" / "bpd")
    args.work = args.work or runs / "train"
    overrides = {
        "tasks": tuple(args.tasks) if args.tasks else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "batch_size": args.batch_size,
        "eval_samples": args.eval_samples,
        "iwae_samples": args.iwae_samples,
        "grid_size": args.grid_size,
        **dict(args.set),
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.png_scale is None:
        args.png_scale = 4 if args.config == "cpu" else 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training speed; the bpd sums are accumulated in float32+
    command = command_line(None if argv is None else ["benchmarks/bpd.py", *argv])
    rows: list[dict] = []
    source = source_state()  # before the run rewrites the tracked sample grids
    start = time.perf_counter()
    for task in cfg.tasks:
        rows += run_task(task, cfg, args, device)
        # after every task, so a long run keeps what it has
        write_results(
            args.out,
            "bpd",
            rows,
            command=command,
            device=device,
            extra={"config": dataclasses.asdict(cfg)},
            source=source,
        )
    print(f"results -> {args.out} ({time.perf_counter() - start:.0f} s in all)")
    for r in rows:
        if r["seed"] in ("mean", None):
            spread = f" ± {r['std']:.4f}" if "std" in r else ""
            print(f"  {r['task']:14s} {r['method']:17s} {r['value']:.4f}{spread} bits/dim  ({r['params']:,} params)")


if __name__ == "__main__":
    main()
