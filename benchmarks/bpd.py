r"""Test-set bits/dim of an NTM against a single TarFlow-style flow and the Gaussian-step model, at equal time.

Methods, all trained by maximum likelihood on uniformly dequantised data in [-1, 1) with AdamW, warmup and
cosine decay, for the **same wall-clock time** on the same device (the ``equal-time`` budget): the NTM
trains first (for ``budget_seconds``, or for ``iters`` iterations when that is 0) and its measured
seconds become the budget of every other likelihood model of the same seed, whose learning-rate schedule
runs on elapsed time so that it completes whatever its speed. Each row records ``train_seconds``,
``train_iters``, ``params`` and ``time_ratio`` (its seconds over the NTM's).

* ``ntm``: :class:`~trajflow.NTM` with T = 4, a :class:`TransformerTransporter` (shallow causal AR flow)
  and a :class:`TransformerPredictor`, trained with :class:`~trajflow.TrajectoryNLL` with :math:`t_{\min}`
  fixed at 0, so that :math:`x_{t_0}` *is* the dequantised image and the bound is about the data.
  Reported: the importance-weighted bound with ``iwae_samples`` = K trajectories per image
  (:func:`trajflow.likelihood.elbo_bits_per_dim` with ``bound="both"``), and the ELBO on the same draws.
* ``tarflow``: one :class:`TransformerTransporter` with more blocks, used alone as a flow over a
  :math:`\mathcal{N}(0, I)` base at a fixed time (t = 0), with its parameter count matched to the NTM's
  (within 10%). Reported: the exact dequantised bits/dim (:func:`trajflow.likelihood.flow_bits_per_dim`).
* ``gaussian``: the Gaussian-step model (an :class:`IdentityTransporter` and the same predictor, T = 4),
  the "Gaussian bottleneck" NTM removes, trained like the NTM. Reported: its IWAE and ELBO bits/dim.

Every trained method runs for each of the config's seeds (rows with an integer ``seed``); one more row
per method has ``seed: "mean"``, with ``value`` the mean over seeds, ``std`` the sample standard
deviation, ``min``/``max`` and ``seeds``. With seed 0 the script also trains a flow-matching velocity model
(:class:`TransformerVelocity`, the predictor's backbone) and writes 4-step sample grids (NTM,
Gaussian-step, flow matching with Euler) as PNGs.

Usage::

    python benchmarks/bpd.py --config cpu                 # sklearn digits 8x8, 17 levels, ~18 min on one core
    python benchmarks/bpd.py --config gpu                 # MNIST and Fashion-MNIST 28x28, hours on one H100
    python benchmarks/bpd.py --split validation --seeds 0 --set ntm_mode=trajectory --out /tmp/v.json  # tuning
    python benchmarks/bpd.py --config gpu --max-iters 2 --max-eval 16 --out /tmp/bpd.json   # a smoke test

Bits/dim follow TarFlow's ``evaluate_bpd.py`` convention: :math:`-\log p / (D \ln 2) + \log_2(K / 2)` on
[-1, 1) (7 for 8-bit MNIST, :math:`\log_2 8.5` for the 17-level digits). See ``docs/bpd.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import trajflow
from trajflow.baselines.flow_matching import FlowMatchingLoss, euler_sample
from trajflow.data.images import ImageDataset, from_unit_range, load_image_dataset
from trajflow.likelihood import dequantize, elbo_bits_per_dim, flow_bits_per_dim
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig, TransformerVelocity
from trajflow.transporters import IdentityTransporter
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script
from _common import RESULTS, ROOT, command_line, read_results, source_state, write_results  # noqa: E402

LOG_2PI = math.log(2 * math.pi)


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
    iters: int
    lr: float
    warmup: int
    eval_samples: int  # dequantisation draws per test image
    eval_batch: int
    iwae_samples: int = 64  # K forward trajectories per dequantised image for the trajectory models
    iwae_dequantizations: int = 1  # their dequantisation draws per image (eval_samples is the flow's)
    seeds: tuple[int, ...] = (0, 1, 2)
    ntm_batch_size: int = 0  # > 0: the batch size of the NTM and the Gaussian-step model (tuned separately)
    ntm_lr: float = 0.0  # > 0: their peak learning rate
    budget_seconds: float = 0.0  # > 0: the NTM trains for this many seconds (else for `iters`); others as long
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
    # budget_seconds of wall-clock time (pair mode, batch 32: tuned on the validation split, docs/bpd.md),
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
        iters=600,  # the warmup's share (50 / 600) and flow matching's iterations
        lr=3e-3,
        warmup=50,
        eval_samples=4,
        eval_batch=355,
        iwae_samples=64,
        ntm_mode="pair",
        budget_seconds=80.0,
    ),
    # 28x28 as 196 tokens of 2x2 patches; ~45M parameters per likelihood model. Not run in this repository
    # yet: the budget (iterations) is a plan for one H100, not a measured time.
    "gpu": BpdConfig(
        tasks=("mnist", "fashion-mnist"),
        patch_size=2,
        width=512,
        heads=8,
        predictor_depth=12,
        transporter_blocks=2,
        transporter_layers=2,
        batch_size=256,
        iters=60_000,
        lr=3e-4,
        warmup=2_000,
        eval_samples=4,
        eval_batch=500,
        shift=trajflow.sequence_shift(196),
    ),
}


# -- models ---------------------------------------------------------------------------------------------------


class FlowAtTime(nn.Module):
    r"""A transporter used alone as a normalizing flow: :math:`\log p(y) = \log \mathcal{N}(f(y, t); 0, I)
    + \log|\det \partial f / \partial y|` at a fixed time ``t`` (TarFlow with a constant time embedding)."""

    def __init__(self, transporter: TransformerTransporter, t: float = 0.0) -> None:
        super().__init__()
        self.transporter = transporter
        self.t = t

    def _times(self, y: Tensor) -> Tensor:
        return torch.full(y.shape[:1], self.t, device=y.device)

    def log_prob(self, y: Tensor) -> Tensor:
        u, ladj = self.transporter(y, self._times(y))
        return (-0.5 * u.float().square() - 0.5 * LOG_2PI).flatten(1).sum(-1) + ladj

    @torch.no_grad()
    def sample(self, n: int, device: torch.device) -> Tensor:
        u = torch.randn(n, *self.transporter.event_shape, device=device)
        return self.transporter.inverse(u, self._times(u))


def pixel_categorical_bits_per_dim(train: Tensor, test: Tensor, levels: int, alpha: float = 0.5) -> float:
    r"""Exact test bits/dim of independent per-pixel categoricals fitted on ``train`` (add-``alpha`` smoothing).

    A no-training sanity floor: :math:`-\frac{1}{D}\sum_d \log_2 \hat P_d(x_d)` with
    :math:`\hat P_d(k) \propto n_{d,k} + \alpha`. It is a discrete model, so no dequantisation is involved;
    any likelihood model above this number has not learned more than the per-pixel histograms.
    """
    x, y = train.flatten(1).long().cpu(), test.flatten(1).long().cpu()
    counts = torch.full((x.shape[1], levels), alpha, dtype=torch.float64)
    counts.scatter_add_(1, x.T, torch.ones(x.T.shape, dtype=torch.float64))
    log_p = torch.log(counts / counts.sum(1, keepdim=True))
    return float(-log_p.gather(1, y.T).sum() / (y.numel() * math.log(2.0)))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def predictor_config(cfg: BpdConfig, image_shape: tuple[int, int, int]) -> TransformerPredictorConfig:
    return TransformerPredictorConfig(
        image_shape, cfg.patch_size, width=cfg.width, depth=cfg.predictor_depth, heads=cfg.heads, validate_args=False
    )


def transporter_config(
    cfg: BpdConfig, image_shape: tuple[int, int, int], blocks: int, layers: int
) -> TransformerTransporterConfig:
    return TransformerTransporterConfig(
        image_shape,
        cfg.patch_size,
        width=cfg.width,
        heads=cfg.heads,
        blocks=blocks,
        layers_per_block=layers,
        validate_args=False,
    )


def matched_tarflow(cfg: BpdConfig, image_shape: tuple[int, int, int], target: int) -> TransformerTransporterConfig:
    """The TarFlow stack (same width) whose parameter count is closest to ``target``; ties go to more blocks.

    Candidates are built on the meta device, so counting costs no memory even for the GPU config.
    """
    best: tuple[float, int, TransformerTransporterConfig] | None = None
    for blocks in range(2, 17):
        for layers in range(1, 9):
            tc = transporter_config(cfg, image_shape, blocks, layers)
            with torch.device("meta"):
                n = num_params(TransformerTransporter(tc))
            key = (abs(n - target) / target, -blocks, tc)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    if best[0] > 0.1:
        raise RuntimeError(f"no TarFlow stack within 10% of {target} parameters (best off by {best[0]:.1%})")
    return best[2]


def build_models(cfg: BpdConfig, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
    pc = predictor_config(cfg, image_shape)
    tc = transporter_config(cfg, image_shape, cfg.transporter_blocks, cfg.transporter_layers)
    ntm = trajflow.NTM(TransformerTransporter(tc), TransformerPredictor(pc))
    return {
        "ntm": ntm,
        "tarflow": FlowAtTime(TransformerTransporter(matched_tarflow(cfg, image_shape, num_params(ntm)))),
        "gaussian": trajflow.NTM(IdentityTransporter(image_shape), TransformerPredictor(pc)),
        "fm": TransformerVelocity(pc),
    }


def training_loss(name: str, cfg: BpdConfig) -> Callable[[nn.Module, Tensor], Tensor]:
    """The per-dimension objective of each method (all are NLLs except flow matching's regression)."""
    if name in ("ntm", "gaussian"):
        # t_min fixed at 0: the cleanest level is the dequantised image itself, so the model trained is the
        # one whose ELBO bounds the data likelihood (a t_min > 0 model would describe noised images).
        return trajflow.TrajectoryNLL(
            steps=cfg.steps, t_min=(0.0, 0.0), shift=cfg.shift, mode=cfg.ntm_mode, cond_drop=0.0
        )
    if name == "tarflow":
        return lambda model, y: -model.log_prob(y).mean() / y[0].numel()
    if name == "fm":
        return FlowMatchingLoss(cond_drop=0.0)
    raise ValueError(f"unknown method {name!r}")


# -- training and evaluation ----------------------------------------------------------------------------------


def batch_size_of(name: str, cfg: BpdConfig) -> int:
    """The training batch size of ``name``: ``ntm_batch_size`` for the trajectory models if set."""
    return cfg.ntm_batch_size if name in ("ntm", "gaussian") and cfg.ntm_batch_size > 0 else cfg.batch_size


def lr_of(name: str, cfg: BpdConfig) -> float:
    """The peak learning rate of ``name``: ``ntm_lr`` for the trajectory models if set."""
    return cfg.ntm_lr if name in ("ntm", "gaussian") and cfg.ntm_lr > 0 else cfg.lr


def lr_at(progress: float, cfg: BpdConfig, peak: float | None = None) -> float:
    """Linear warmup over the first ``warmup / iters`` of training (at most 10%), then cosine decay to 1%.

    ``progress`` in [0, 1] is the fraction of the budget spent: iterations for the NTM, wall-clock seconds
    for the methods trained for as long as the NTM, so that every schedule completes whatever the speed.
    """
    peak = cfg.lr if peak is None else peak
    warm = min(cfg.warmup, max(1, cfg.iters // 10)) / cfg.iters
    if progress < warm:
        return peak * max(progress / warm, 1.0 / cfg.iters)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warm) / (1 - warm)))))


def train(
    name: str,
    model: nn.Module,
    data: Tensor,
    levels: int,
    cfg: BpdConfig,
    seed: int,
    *,
    iters: int | None = None,
    seconds: float | None = None,
) -> tuple[float, int, float]:
    """Train on fresh dequantisations of random minibatches of ``data`` (uint8 on the device), for ``iters``
    iterations or, with ``seconds``, until that much wall-clock time has passed (the equal-time budget).

    Returns ``(seconds, iterations, mean loss over the last 10% of iterations)``.
    """
    if (iters is None) == (seconds is None):
        raise ValueError("train: give exactly one of iters and seconds")
    device = data.device
    gen = torch.Generator(device).manual_seed(seed)
    loss_fn = training_loss(name, cfg)
    peak, batch = lr_of(name, cfg), batch_size_of(name, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    it = 0
    while True:
        elapsed = time.perf_counter() - start
        if iters is not None and it >= iters:
            break
        if seconds is not None and elapsed >= seconds:
            break
        progress = it / iters if iters is not None else elapsed / seconds  # type: ignore[operator]
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, cfg, peak)
        idx = torch.randint(0, data.shape[0], (batch,), device=device, generator=gen)
        y = dequantize(data[idx], levels, gen)
        if name in ("ntm", "gaussian"):
            loss = loss_fn(model, y, generator=gen)
        else:
            loss = loss_fn(model, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss.detach())  # one sync per step, so the clock measures finished work
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: the loss became {value} at iteration {it}")
        losses.append(value)
        if it % cfg.log_every == 0:
            total = f"/{iters}" if iters is not None else f" of {seconds:.0f} s"
            print(f"  [{name}] iter {it:6d}{total}  loss {value:.4f}  ({elapsed:.0f} s)", flush=True)
        it += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    tail = losses[-max(1, len(losses) // 10) :]
    return time.perf_counter() - start, it, sum(tail) / len(tail)


@torch.no_grad()
def evaluate(name: str, model: nn.Module, data: Tensor, levels: int, cfg: BpdConfig, seed: int) -> dict[str, float]:
    """Mean bits/dim on ``data``: the exact dequantised bpd of the flow (``{"exact": ...}``); the IWAE bound
    with ``cfg.iwae_samples`` trajectories and the ELBO on the same draws for the trajectory models
    (``{"iwae": ..., "elbo": ...}``)."""
    model.eval()
    gen = torch.Generator(data.device).manual_seed(seed + 1)
    totals: dict[str, float] = {}
    for start in range(0, data.shape[0], cfg.eval_batch):
        x = data[start : start + cfg.eval_batch]
        if name == "tarflow":
            out = {
                "exact": flow_bits_per_dim(model, x, levels, event_dim=3, num_samples=cfg.eval_samples, generator=gen)
            }
        else:
            out = elbo_bits_per_dim(
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
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v.sum())
    return {k: v / data.shape[0] for k, v in totals.items()}


@torch.no_grad()
def sample_grid(name: str, model: nn.Module, cfg: BpdConfig, shape: tuple[int, int, int], device, seed: int) -> Tensor:
    """``grid_size^2`` samples in [-1, 1]: 4 predictor steps (NTM, Gaussian), 4 Euler steps (FM), one flow."""
    torch.manual_seed(seed + 2)
    n = cfg.grid_size**2
    model.eval()
    if name in ("ntm", "gaussian"):
        return model.sample((n,), steps=cfg.steps, shift=cfg.shift)
    if name == "fm":
        return euler_sample(model, torch.randn(n, *shape, device=device), cfg.steps, shift=cfg.shift)
    return model.sample(n, device)


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


def run_task(task: str, cfg: BpdConfig, args: argparse.Namespace, device: torch.device) -> list[dict]:
    train_set, test_set = split_data(task, args.split, cfg, args.max_eval)
    levels, shape = train_set.levels, train_set.image_shape
    train_data, test_data = train_set.images.to(device), test_set.images.to(device)
    iters = cfg.iters if args.max_iters is None else min(cfg.iters, args.max_iters)
    print(
        f"{task}: {len(train_set)} train / {len(test_set)} {args.split} images {shape}, {levels} levels, "
        f"NTM {f'{cfg.budget_seconds:g} s' if cfg.budget_seconds > 0 and args.max_iters is None else f'{iters} iters'} "
        f"({cfg.ntm_mode} mode), seeds {list(cfg.seeds)}"
    )
    common = {"split": args.split, "levels": levels, "test_images": len(test_set)}
    rows = []
    if "pixel-categorical" in args.methods:
        value = pixel_categorical_bits_per_dim(train_set.images, test_set.images, levels)
        print(f"  [pixel-categorical] {args.split} bits/dim {value:.4f} (exact discrete, no training)")
        rows.append(
            {
                "task": task,
                "method": "pixel-categorical",
                "steps": None,
                "metric": "bits_per_dim",
                "value": round(value, 5),
                "seed": None,  # deterministic: no training, no sampling
                **common,
                "params": train_set.dim * (levels - 1),  # the histograms' free probabilities
                "train_seconds": 0.0,
                "dequantization": "none",
                "num_samples": 0,
                "bound": "exact",
                "budget": "none",
            }
        )
    trained = [m for m in ("ntm", "tarflow", "gaussian") if m in args.methods]
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        models = {k: m.to(device) for k, m in build_models(cfg, shape).items() if k in args.methods}
        params = {k: num_params(m) for k, m in models.items()}
        print(f"  seed {seed}: parameters " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
        if "tarflow" in models and seed == cfg.seeds[0]:
            tf = models["tarflow"].transporter.config
            print(f"  tarflow: {tf.blocks} blocks x {tf.layers_per_block} layers, width {tf.width}")
        # the NTM's measured training seconds: the other methods' budget (the config's, without an NTM)
        budget: float | None = cfg.budget_seconds if cfg.budget_seconds > 0 and "ntm" not in trained else None
        for name in trained:
            model = models[name]
            if name == "ntm" and cfg.budget_seconds > 0 and args.max_iters is None:
                seconds, n_iters, final_loss = train(
                    name, model, train_data, levels, cfg, seed, seconds=cfg.budget_seconds
                )
            elif name == "ntm" or budget is None:
                seconds, n_iters, final_loss = train(name, model, train_data, levels, cfg, seed, iters=iters)
            else:
                seconds, n_iters, final_loss = train(name, model, train_data, levels, cfg, seed, seconds=budget)
            if name == "ntm":
                budget = seconds
            print(f"  [{name}] trained {n_iters} iters in {seconds:.0f} s, final loss {final_loss:.4f}", flush=True)
            if seed == cfg.seeds[0] and name in ("ntm", "gaussian") and not args.no_samples:
                grid = sample_grid(name, model, cfg, shape, device, seed)
                path = args.samples_dir / f"{task}_{name}_{cfg.steps}step.png"
                save_grid(grid, levels, path, cfg.grid_size, scale=args.png_scale)
                print(f"  [{name}] samples -> {path}")
            start = time.perf_counter()
            result = evaluate(name, model, test_data, levels, cfg, seed)
            value = result["exact"] if name == "tarflow" else result["iwae"]
            elbo = result.get("elbo")
            print(
                f"  [{name}] {args.split} bits/dim {value:.4f}"
                + ("" if elbo is None else f" (IWAE-{cfg.iwae_samples}; ELBO {elbo:.4f})")
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            rows.append(
                {
                    "task": task,
                    "method": name,
                    "steps": None if name == "tarflow" else cfg.steps,
                    "metric": "bits_per_dim",
                    "value": round(value, 5),
                    "seed": seed,
                    "budget": "equal-time" if budget is not None else "equal-iterations",
                    "bound": "dequantized" if name == "tarflow" else f"iwae-{cfg.iwae_samples}+dequantized",
                    "elbo_bits_per_dim": None if elbo is None else round(elbo, 5),
                    **common,
                    "params": params[name],
                    "train_seconds": round(seconds, 1),
                    "train_iters": n_iters,
                    "seconds_per_iter": round(seconds / n_iters, 4),
                    "time_ratio": None if budget is None else round(seconds / budget, 3),
                    "reference": "ntm" if budget is not None else None,
                    "train_mode": cfg.ntm_mode if name != "tarflow" else None,
                    "batch_size": batch_size_of(name, cfg),
                    "lr": lr_of(name, cfg),
                    "dequantization": "uniform",
                    "num_samples": cfg.eval_samples if name == "tarflow" else cfg.iwae_dequantizations,
                    "num_trajectories": None if name == "tarflow" else cfg.iwae_samples,
                    "final_train_loss_nats_per_dim": round(final_loss, 5),
                }
            )
        if "fm" in models and seed == cfg.seeds[0] and not args.no_samples:
            # flow matching has no likelihood here: it is the 4-step sample-quality baseline of the grids
            seconds, _, _ = train("fm", models["fm"], train_data, levels, cfg, seed, iters=iters)
            grid = sample_grid("fm", models["fm"], cfg, shape, device, seed)
            path = args.samples_dir / f"{task}_fm_{cfg.steps}step.png"
            save_grid(grid, levels, path, cfg.grid_size, scale=args.png_scale)
            print(f"  [fm] trained {iters} iters in {seconds:.0f} s; samples -> {path}")
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
    parser.add_argument("--max-iters", type=int, help="cap the NTM's training iterations (smoke tests)")
    parser.add_argument("--max-eval", type=int, help="evaluate on the first N images only (smoke tests)")
    parser.add_argument("--batch-size", type=int, help="override the training batch size (smoke tests)")
    parser.add_argument("--eval-samples", type=int, help="override the dequantisation draws per image (smoke tests)")
    parser.add_argument("--iwae-samples", type=int, help="override K, the IWAE trajectories per image")
    parser.add_argument("--grid-size", type=int, help="override the side of the sample grids (smoke tests)")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grids and flow matching")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a busy shared CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "bpd.json")
    parser.add_argument("--samples-dir", type=Path, default=ROOT / "docs" / "bpd")
    parser.add_argument("--png-scale", type=int, help="PNG upscaling (default: 4 for 8x8 data, 2 otherwise)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
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
