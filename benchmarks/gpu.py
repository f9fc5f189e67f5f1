r"""GPU speed benchmark of trajflow's image models (issue 10): one command, under 9 minutes on one H100/H200.

Sections (``--sections``, default all; they run in the order a, b, c, f, d, e):

a. **Training throughput**, NTM against flow matching on the same predictor: a class-conditional
   :class:`~trajflow.predictors.transformer.TransformerPredictor` of width 768 x 12 layers over 256 tokens
   (4 x 32 x 32 latents, patch 2), trained with :class:`~trajflow.TrajectoryNLL` (T = 4) under a
   :class:`~trajflow.transporters.TransformerTransporter` of 2 blocks x 4 causal layers (width 768), against
   a :class:`~trajflow.velocity.TransformerVelocity` of the same width and depth trained with
   :class:`~trajflow.baselines.flow_matching.FlowMatchingLoss`. Batch 256 images per optimizer step (NTM: 4
   micro-batches of 64, accumulated, since it runs T levels per image), bf16 autocast, ``torch.compile`` of
   each network, fused AdamW. Reports images/s, their ratio and each model's MFU.
b. **Transporter inverse** at batch 64 and 256: the eager KV cache (``method="kv-cache"``) against the
   static cache replayed from one CUDA graph per batch size (``method="graph"``), with the max abs
   difference between the two outputs; on CUDA also the static cache run eagerly (``static-eager``).
c. **4-step sampling**, images/s: the full path (predictor x 4 + transporter inverse of every level +
   trajectory score denoising, :func:`~trajflow.denoise.sample_denoised`; with the eager inverse, and with
   the CUDA-graph inverse) against the fast path (predictor x 4 + a learned
   :class:`~trajflow.denoise.TransformerDenoiser` of 8 layers, :func:`~trajflow.denoise.fast_sample`).
d. **Stability**: N bf16 training steps (1,000 on GPU) of the text-to-image NTM of
   ``examples/t2i/configs/emoji_32_gpu.json`` on synthetic images and text features; counts non-finite
   losses or gradient norms (checked on device, read once at the end) and reports the peak memory.
e. **Host synchronisations**: one training step of (d) under ``torch.cuda.set_sync_debug_mode("error")``
   (pass, or the error's message), then under ``"warn"`` to list every synchronising call (GPU only).
f. **SD3 fine-tuning throughput** (issue 17): an NTM fine-tuned from a random diffusers
   ``SD3Transformer2DModel`` of 488,378,432 parameters (13 joint blocks, 16 heads x 64 = width 1024, prompt
   embeddings 4096 wide, pooled 2048, 16 x 64 x 64 latents = 1024 image tokens at patch 2, i.e. 512 px images,
   + 77 + 256 = 333 text tokens) through :class:`trajflow.contrib.diffusers.SD3Velocity`, with the recipe of
   ``examples/finetune_diffusers`` (its ``configs/sd3_medium_512.json``:
   :func:`~trajflow.finetune.init_from_flow_matching` with the identity transporter, the posterior mean and a
   delta-sigma head; :class:`~trajflow.finetune.FinetuneLoss` = pair-mode trajectory NLL + mean alignment
   against a frozen bf16 copy; gradient checkpointing, AdamW lr 1e-5, clip 1.0), against flow matching
   (:class:`~trajflow.baselines.flow_matching.FlowMatchingLoss`) on the same backbone. Random latents and
   prompt embeddings (no text encoder, no VAE), batch 32, bf16 autocast, no compile; 2 warm-up and 5 timed
   steps each. Methods ``ntm-fm`` and ``fm``: ``train_images_per_s``, ``peak_memory_gib``
   (``torch.cuda.max_memory_allocated``: weights, gradients, AdamW states, the frozen copy, activations) and
   ``ntm-fm``'s ``throughput_ratio_vs_fm``. Needs diffusers: without it one ``section_skipped`` row.

FLOP count (per image, one training step = forward + backward = 3 forward passes), for one pass of a
transformer with ``P`` per-token parameters (every ``nn.Linear`` applied to tokens: attention, MLP, input
projection, head; the time MLPs run once per image and are left out), ``layers`` layers, ``n`` tokens and
width ``w``::

    pass(P, layers, n, w) = 6 P n + 12 layers n^2 w

the formula of the reference figures (``reference/gpu-figures.md``: "6 x params x tokens + 12 x layers x
batch x tokens^2 x width"); causal attention is counted in full, as there. Then::

    FM  = pass(P_velocity, 12, L + 1, 768)                      (L = 256 image tokens + 1 class token)
    NTM = T pass(P_predictor, 12, L + 1, 768) + T sum_blocks pass(P_block, 4, L - 1, 768)
    NTM, pair-wise loss (``--ntm-pair``) = pass(P_predictor, ...) + 2 sum_blocks pass(P_block, ...)

(the NTM's trajectory NLL runs the predictor on T levels and the transporter on the T levels below
t = 1; a causal block sees tokens 0..L-2). MFU = FLOPs per image x images/s / peak, with the peak of
``--peak-tflops`` (default 790 TFLOP/s, the peak the reference figures use, so the shares compare).

``--repeats N`` times N training steps in (a) and N calls in (b) and (c) instead of the defaults (10, 3, 3);
(f) keeps its own 5 steps. ``--time-budget S`` bounds the run for a hard outer timeout
(``benchmarks/gpu_run.sh``): no section starts once S seconds have passed (a ``section_skipped`` row instead),
(d) stops early, keeping 20 s for (e) and recording the steps it did (``train_steps``, ``planned_steps``,
``stopped_early``), and (f), which runs before the elastic (d), does not start its second method (``fm``) once
fewer than those 20 s are left. ``--incremental`` writes the results file after every section, so a run
killed from outside keeps the finished sections' rows.

``--smoke`` runs the same code at tiny sizes on the CPU in under 2 minutes: no compile, no CUDA graph (the
static cache runs eagerly in the ``static-graph`` rows, marked ``graph: false``), section (e) is recorded
as skipped, (f) fine-tunes a 2-layer SD3 transformer of width 16 on 16 x 8 x 8 latents and 8 text tokens
(seconds). Its numbers are a rehearsal of the code, not measurements.

Writes ``benchmarks/results/speed.json`` (``--smoke``: ``runs/bench-gpu-smoke/speed.json``; ``--out``
overrides) through :mod:`_common`; every row also carries ``device`` and ``torch``.

Usage::

    python benchmarks/gpu.py                  # one GPU, ~9 minutes
    python benchmarks/gpu.py --smoke          # CPU rehearsal, < 2 minutes
    python benchmarks/gpu.py --sections b,c   # some sections only
    python benchmarks/gpu.py --sections f     # the SD3 fine-tuning throughput only (issue 17)
    python benchmarks/gpu.py --repeats 3 --time-budget 210 --incremental --out OUT/speed.json  # gpu_run.sh
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # for the examples package (the t2i lab)
from _common import RESULTS, ROOT, device_string, write_results  # noqa: E402

from examples.t2i.config import T2IConfig  # noqa: E402
from examples.t2i.model import build_model  # noqa: E402
from trajflow.baselines.flow_matching import FlowMatchingLoss  # noqa: E402
from trajflow.denoise import TransformerDenoiser, fast_sample, sample_denoised  # noqa: E402
from trajflow.finetune import FinetuneLoss, MeanAlignmentLoss, init_from_flow_matching  # noqa: E402
from trajflow.losses import TrajectoryNLL  # noqa: E402
from trajflow.model import NTM  # noqa: E402
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig  # noqa: E402
from trajflow.process import time_grid  # noqa: E402
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig  # noqa: E402
from trajflow.velocity import TransformerVelocity  # noqa: E402

SMOKE_OUT = ROOT / "runs" / "bench-gpu-smoke" / "speed.json"
SYNC_RESERVE_SECONDS = 20.0  # --time-budget: what (d) leaves for (e)
T2I_CONFIGS = ROOT / "examples" / "t2i" / "configs"
FINETUNE_CONFIGS = ROOT / "examples" / "finetune_diffusers" / "configs"  # (f): the fine-tuning recipe
FLOP_FORMULA = (
    "per image, training (fwd+bwd): pass(P, layers, n, w) = 6*P*n + 12*layers*n^2*w; "
    "FM = pass(P_velocity, depth, L+1, w); "
    "NTM = T*pass(P_predictor, depth, L+1, w) + T*sum_blocks pass(P_block, layers_per_block, L-1, w_transporter); "
    "NTM pair mode = pass(P_predictor, ...) + 2*sum_blocks pass(P_block, ...); "
    "P = per-token nn.Linear parameters (time MLPs excluded), L image tokens, +1 class token"
)


@dataclass
class Sizes:
    """Every size of the benchmark (``GPU`` and ``SMOKE`` below)."""

    image: tuple[int, int, int] = (4, 32, 32)
    patch: int = 2
    width: int = 768
    depth: int = 12
    heads: int = 12
    num_classes: int = 1000
    transporter_width: int = 768
    transporter_heads: int = 12
    transporter_blocks: int = 2
    transporter_layers: int = 4
    steps: int = 4  # T
    # (a)
    train_batch: int = 256
    ntm_micro_batch: int = 64
    fm_micro_batch: int = 256
    train_warmup: int = 3
    train_steps: int = 10
    compile: bool = True
    # (b)
    inverse_batches: tuple[int, ...] = (64, 256)
    inverse_repeats: int = 3
    # (c)
    sample_batch: int = 64
    sample_repeats: int = 3
    sample_t_min: float = 0.02
    denoiser_depth: int = 8
    # (d), (e)
    t2i_config: str = "emoji_32_gpu.json"
    t2i_overrides: list[str] = field(default_factory=list)
    t2i_text_features: int = 384  # MiniLM's width
    t2i_batch: int = 128
    long_steps: int = 1000
    long_compile: bool = False  # eager: ~2 minutes for 1,000 steps; compiling would add its own minutes
    # (f): a random SD3Transformer2DModel of 488,378,432 parameters (13 joint blocks of width 16 x 64 = 1024),
    # SD3's text widths (4096-wide prompt embeddings, 2048-wide pooled), 16 x 64 x 64 latents (512 px images)
    sd3_label: str = "0.5b"
    sd3_layers: int = 13
    sd3_heads: int = 16
    sd3_head_dim: int = 64
    sd3_joint_dim: int = 4096
    sd3_pooled_dim: int = 2048
    sd3_latent: tuple[int, int, int] = (16, 64, 64)
    sd3_text_tokens: int | None = None  # None: CLIP's 77 + the recipe's T5 max_sequence_length (256) = 333
    sd3_batch: int = 32
    sd3_warmup: int = 2
    sd3_steps: int = 5
    sd3_recipe: str = "sd3_medium_512.json"  # examples/finetune_diffusers/configs/
    sd3_transporter: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's transporter


GPU = Sizes()
SMOKE = Sizes(
    image=(4, 8, 8),
    width=32,
    depth=2,
    heads=2,
    num_classes=10,
    transporter_width=32,
    transporter_heads=2,
    transporter_layers=2,
    train_batch=8,
    ntm_micro_batch=4,
    fm_micro_batch=8,
    train_warmup=1,
    train_steps=2,
    compile=False,
    inverse_batches=(4, 8),
    inverse_repeats=2,
    sample_batch=4,
    sample_repeats=2,
    denoiser_depth=2,
    t2i_config="shapes_cpu_smoke.json",
    t2i_overrides=[
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "model.time_features=16",
        "model.validate_args=false",
        "text.max_length=8",
    ],
    t2i_text_features=16,
    t2i_batch=4,
    long_steps=20,
    long_compile=False,
    sd3_label="tiny",
    sd3_layers=2,
    sd3_heads=2,
    sd3_head_dim=8,
    sd3_joint_dim=16,
    sd3_pooled_dim=16,
    sd3_latent=(16, 8, 8),
    sd3_text_tokens=8,
    sd3_batch=4,
    sd3_warmup=1,
    sd3_steps=2,
    sd3_transporter={"width": 16, "heads": 2, "layers_per_block": 1},
)


# ------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on the device (CPU autocast too, so the smoke run rehearses the same dtypes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Seconds of ``repeats`` calls after ``warmup`` calls (synchronised on CUDA), and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def token_params(module: nn.Module) -> int:
    """Parameters of the ``nn.Linear`` layers applied per token (time MLPs, run once per image, excluded)."""
    total = 0
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and "time_mlp" not in name:
            total += sum(p.numel() for p in m.parameters())
    return total


def pass_flops(params: int, layers: int, tokens: int, width: int) -> float:
    """Training FLOPs (forward + backward) of one sequence: ``6 P n + 12 layers n^2 w``."""
    return 6.0 * params * tokens + 12.0 * layers * tokens**2 * width


def randomise_heads(transporter: TransformerTransporter, std: float = 0.02) -> None:
    """Small random heads instead of the zero init, so the transporter is not the identity."""
    for block in transporter.blocks:
        nn.init.normal_(block.head.weight, std=std)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; whole process


class Bench:
    """Collects rows with the common keys."""

    def __init__(self, device: torch.device, sizes: Sizes, smoke: bool, deadline: float | None = None) -> None:
        self.device, self.sizes, self.smoke = device, sizes, smoke
        self.deadline = deadline  # time.perf_counter() by which the run should end (--time-budget), or None
        self.rows: list[dict[str, Any]] = []
        self.common = {"seed": 0, "device": device_string(device), "torch": torch.__version__}

    def add(self, task: str, method: str, steps: int | None, metric: str, value: Any, **extra: Any) -> None:
        row = {"task": task, "method": method, "steps": steps, "metric": metric, "value": value, **self.common}
        row.update(extra)
        self.rows.append(row)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {method:>16} {metric:<28} {shown}  {extra.get('note', '')}", flush=True)


# ----------------------------------------------------------------------------------------------- models


def predictor_config(s: Sizes) -> TransformerPredictorConfig:
    return TransformerPredictorConfig(
        s.image,
        s.patch,
        width=s.width,
        depth=s.depth,
        heads=s.heads,
        num_classes=s.num_classes,
        validate_args=False,
    )


def transporter_config(s: Sizes) -> TransformerTransporterConfig:
    return TransformerTransporterConfig(
        s.image,
        s.patch,
        width=s.transporter_width,
        heads=s.transporter_heads,
        layers_per_block=s.transporter_layers,
        blocks=s.transporter_blocks,
        validate_args=False,
    )


def make_ntm(s: Sizes, device: torch.device) -> NTM:
    return NTM(TransformerTransporter(transporter_config(s)), TransformerPredictor(predictor_config(s))).to(device)


def train_step(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    opt: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Any]],
    device: torch.device,
    clip: float | None = None,
) -> Callable[[], tuple[Tensor, Tensor | None]]:
    """One optimizer step over the micro-batches ``batches`` (gradients accumulated); returns a closure."""
    total = sum(x.shape[0] for x, _ in batches)

    def step() -> tuple[Tensor, Tensor | None]:
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for x, cond in batches:
            with amp(device):
                loss = loss_fn(model, x, cond) * (x.shape[0] / total)
            loss.backward()
            loss_sum = loss_sum + loss.detach().float()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
        opt.step()
        return loss_sum, norm

    return step


def optimizer(model: nn.Module, device: torch.device, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------- sections


def section_train(b: Bench, peak_tflops: float, pair: bool = False) -> None:
    """(a) NTM vs flow matching training throughput and MFU on the same predictor (``pair``: also the
    pair-wise NTM loss, one random factor per image: method ``ntm-pair``)."""
    s, device = b.sizes, b.device
    L = (s.image[1] // s.patch) * (s.image[2] // s.patch)
    n_pred = L + 1  # + the class token
    task = (
        f"train {'x'.join(map(str, s.image))} p{s.patch} ({L} tokens) predictor w{s.width}x{s.depth} "
        f"transporter {s.transporter_blocks}x{s.transporter_layers} w{s.transporter_width} "
        f"batch {s.train_batch} bf16"
    )
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s.train_batch, *s.image, device=device, generator=g)
    y = torch.randint(s.num_classes, (s.train_batch,), device=device, generator=g)
    results: dict[str, float] = {}
    flops_of: dict[str, float] = {}  # FLOPs per training image, for the FLOP-bound throughput ratio
    for method in ("ntm", "fm-euler", "ntm-pair") if pair else ("ntm", "fm-euler"):
        torch.manual_seed(0)
        if method.startswith("ntm"):
            model: nn.Module = make_ntm(s, device)
            mode = "pair" if method == "ntm-pair" else "trajectory"
            loss_fn: Callable[..., Tensor] = TrajectoryNLL(steps=s.steps, mode=mode, cond_drop=0.1)
            micro = s.ntm_micro_batch if mode == "trajectory" else s.fm_micro_batch
            transporter = sum(
                pass_flops(token_params(block), s.transporter_layers, L - 1, s.transporter_width)
                for block in model.transporter.blocks
            )
            predictor = pass_flops(token_params(model.predictor), s.depth, n_pred, s.width)
            # trajectory: T predictor levels, T transporter levels; pair: 1 predictor, 2 transporter levels
            flops = s.steps * (predictor + transporter) if mode == "trajectory" else predictor + 2 * transporter
            nets = [model.predictor, model.transporter]
        else:
            model = TransformerVelocity(predictor_config(s)).to(device)
            loss_fn = FlowMatchingLoss(cond_drop=0.1)
            micro = s.fm_micro_batch
            flops = pass_flops(token_params(model), s.depth, n_pred, s.width)
            nets = [model]
        if s.compile:
            for net in nets:
                net.compile()
        model.train()
        opt = optimizer(model, device)
        batches = list(zip(x.split(micro), y.split(micro)))
        step = train_step(model, loss_fn, opt, batches, device)
        start = time.perf_counter()
        times, (loss, _) = timed(step, device, s.train_steps, warmup=s.train_warmup)
        warm_s = time.perf_counter() - start - sum(times)
        step_s = statistics.median(times)
        ips = s.train_batch / step_s
        results[method] = ips
        flops_of[method] = flops
        tflops = flops * ips / 1e12
        extra = dict(
            batch=s.train_batch,
            micro_batch=micro,
            compiled=s.compile,
            step_seconds=step_s,
            warmup_seconds=warm_s,
            all=times,
            loss=float(loss),
        )
        steps = s.steps if method.startswith("ntm") else None
        b.add(task, method, steps, "train_images_per_s", ips, **extra)
        b.add(
            task,
            method,
            steps,
            "mfu",
            tflops / peak_tflops,
            flops_per_image=flops,
            tflops_per_s=tflops,
            peak_tflops=peak_tflops,
            flop_formula=FLOP_FORMULA,
            target=0.40 if method.startswith("ntm") else None,  # the plain transformer's reference is 0.47
        )
        del model, opt, step, batches, nets
        free(device)
    for method in results:
        if method != "fm-euler":
            # Equal efficiency would give FM's FLOPs over the method's (the trajectory loss costs ~6.6x FM per
            # image, the pair loss ~2.3x: docs/performance.md); the target is 0.9 of that bound.
            bound = flops_of["fm-euler"] / flops_of[method]
            b.add(
                task,
                method,
                s.steps,
                "throughput_ratio_vs_fm",
                results[method] / results["fm-euler"],
                baseline="fm-euler",
                flop_bound_ratio=bound,
                target=0.9 * bound,
            )


def section_inverse(b: Bench) -> None:
    """(b) Transporter inverse: eager KV cache vs static cache + CUDA graph."""
    s, device = b.sizes, b.device
    graph = device.type == "cuda"
    torch.manual_seed(0)
    f = TransformerTransporter(transporter_config(s)).to(device).eval()
    randomise_heads(f)
    L = f.config.num_tokens
    task = (
        f"transporter inverse {'x'.join(map(str, s.image))} p{s.patch} ({L} tokens) "
        f"{s.transporter_blocks}x{s.transporter_layers} w{s.transporter_width} bf16"
    )
    for batch in s.inverse_batches:
        g = torch.Generator(device=device).manual_seed(batch)
        u = torch.randn(batch, *s.image, device=device, generator=g)
        t = torch.rand(batch, device=device, generator=g)
        with torch.no_grad(), amp(device):
            kv_times, x_kv = timed(partial(f.inverse, u, t, method="kv-cache"), device, s.inverse_repeats)
            static = partial(f.inverse, u, t, method="graph" if graph else "static")
            start = time.perf_counter()
            static()  # capture (graph) or warm-up
            sync(device)
            capture_s = time.perf_counter() - start
            st_times, x_st = timed(static, device, s.inverse_repeats, warmup=0)
        kv, st = statistics.median(kv_times), statistics.median(st_times)
        diff = float((x_kv.float() - x_st.float()).abs().max())
        common = dict(batch=batch, repeats=s.inverse_repeats)
        b.add(task, "kv-cache", None, "inverse_images_per_s", batch / kv, seconds=kv, all=kv_times, **common)
        note = "" if graph else "no CUDA on this device: static cache run eagerly, no graph"
        b.add(
            task,
            "static-graph",
            None,
            "inverse_images_per_s",
            batch / st,
            seconds=st,
            all=st_times,
            graph=graph,
            capture_seconds=capture_s,
            note=note,
            target=1500 if batch == 256 else None,
            **common,
        )
        b.add(task, "static-graph", None, "speedup", kv / st, baseline="kv-cache", graph=graph, **common)
        b.add(task, "static-graph", None, "max_abs_diff_vs_kv_cache", diff, graph=graph, **common)
        if graph:  # the same static decode without the graph: how much is fixed shapes, how much is launches
            with torch.no_grad(), amp(device):
                eager_times, _ = timed(partial(f.inverse, u, t, method="static"), device, s.inverse_repeats)
            eager = statistics.median(eager_times)
            b.add(
                task,
                "static-eager",
                None,
                "inverse_images_per_s",
                batch / eager,
                seconds=eager,
                all=eager_times,
                graph=False,
                **common,
            )
        del u, t, x_kv, x_st, static
    free(device)


def section_sample(b: Bench) -> None:
    """(c) 4-step sampling: full path (inverse + trajectory score denoising) vs fast path (learned denoiser)."""
    s, device = b.sizes, b.device
    torch.manual_seed(0)
    model = make_ntm(s, device).eval()
    randomise_heads(model.transporter)
    denoiser = TransformerDenoiser(replace(predictor_config(s), depth=s.denoiser_depth)).to(device).eval()
    n = s.sample_batch
    cond = torch.arange(n, device=device) % s.num_classes
    grid = time_grid(s.steps, s.sample_t_min, device=device)
    task = (
        f"sample {s.steps} steps {'x'.join(map(str, s.image))} predictor w{s.width}x{s.depth} transporter "
        f"{s.transporter_blocks}x{s.transporter_layers} denoiser {s.denoiser_depth} layers batch {n} bf16"
    )
    graph_method = "graph" if device.type == "cuda" else "static"

    def full() -> Tensor:
        return sample_denoised(model.distribution(grid, cond), ())

    def fast() -> Tensor:
        return fast_sample(model, denoiser, (), cond=cond, steps=s.steps, t_min=s.sample_t_min)

    rates = {}
    with amp(device):
        for method, fn, inverse in (
            ("ntm-full", full, "kv-cache"),
            (f"ntm-full-{graph_method}", full, graph_method),
            ("ntm-fast", fast, "kv-cache"),
        ):
            model.transporter.inverse_method = inverse
            times, out = timed(fn, device, s.sample_repeats)
            sec = statistics.median(times)
            rates[method] = n / sec
            b.add(
                task,
                method,
                s.steps,
                "sample_images_per_s",
                n / sec,
                seconds=sec,
                all=times,
                batch=n,
                inverse=inverse if method != "ntm-fast" else None,
                finite=bool(torch.isfinite(out).all()),
            )
    b.add(task, "ntm-fast", s.steps, "speedup", rates["ntm-fast"] / rates["ntm-full"], baseline="ntm-full", target=5.0)
    b.add(
        task,
        "ntm-fast",
        s.steps,
        "speedup_vs_graph_full",
        rates["ntm-fast"] / rates[f"ntm-full-{graph_method}"],
        baseline=f"ntm-full-{graph_method}",
    )


def t2i_setup(b: Bench) -> tuple[nn.Module, Callable[[], tuple[Tensor, Tensor | None]], str, T2IConfig]:
    """The text-to-image NTM of (d)/(e), its optimizer step over synthetic data, a task label and the config."""
    s, device = b.sizes, b.device
    config = T2IConfig.from_json(T2I_CONFIGS / s.t2i_config, s.t2i_overrides)
    res = config.data.resolution
    data_shape = (3, res, res)
    torch.manual_seed(0)
    model = build_model(config, s.t2i_text_features, data_shape).to(device).train()
    if s.long_compile:
        model.predictor.compile()
        model.transporter.compile()
    m = config.model
    loss = TrajectoryNLL(
        steps=m.steps if isinstance(m.steps, int) else tuple(m.steps),
        t_min=m.t_min,
        shift=config.shift_for(data_shape),
        mode=m.mode,
        cond_drop=m.cond_drop,
        validate_args=m.validate_args,
    )
    g = torch.Generator(device=device).manual_seed(0)
    n, length = s.t2i_batch, config.text.max_length
    x = torch.rand(n, *data_shape, device=device, generator=g) * 2 - 1
    feats = torch.randn(n, length, s.t2i_text_features, device=device, generator=g)
    lengths = torch.randint(1, length + 1, (n,), device=device, generator=g)
    mask = torch.arange(length, device=device)[None] < lengths[:, None]
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, fused=device.type == "cuda")
    step = train_step(model, loss, opt, [(x, (feats, mask))], device, clip=config.train.grad_clip)
    task = f"t2i {config.name}: NTM w{m.width}x{m.depth} on 3x{res}x{res}, text {length} tokens, batch {n} bf16"
    return model, step, task, config


def section_long(b: Bench, reserve: float = 0.0) -> tuple[nn.Module, Callable, str] | None:
    """(d) N bf16 training steps of the t2i NTM: no NaN/inf, peak memory. With a deadline (``--time-budget``)
    it stops early once fewer than ``reserve`` seconds are left (after one step at least)."""
    s, device = b.sizes, b.device
    model, step, task, config = t2i_setup(b)
    stop_at = None if b.deadline is None else b.deadline - reserve
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bad = torch.zeros((), dtype=torch.long, device=device)
    first = last = None
    sync(device)
    start = time.perf_counter()
    done = 0
    for i in range(s.long_steps):
        loss, norm = step()
        bad += (~torch.isfinite(loss)).long()
        if norm is not None:
            bad += (~torch.isfinite(norm)).long()
        if i == 0:
            first = loss
        last = loss
        done = i + 1
        if stop_at is not None and time.perf_counter() >= stop_at:  # host time; the queue is synced below
            break
    sync(device)
    seconds = time.perf_counter() - start
    common = dict(
        train_steps=done,
        batch=s.t2i_batch,
        compiled=s.long_compile,
        seconds=seconds,
        first_loss=float(first),
        last_loss=float(last),
        config=s.t2i_config,
    )
    if done < s.long_steps:
        common.update(
            planned_steps=s.long_steps, stopped_early=True, note=f"time budget: {done} of {s.long_steps} steps"
        )
    b.add(task, "ntm", config.model.steps, "nonfinite_steps", int(bad), **common)
    b.add(
        task,
        "ntm",
        config.model.steps,
        "train_images_per_s",
        done * s.t2i_batch / seconds,
        **{"note": "includes compilation" if s.long_compile else "", **common},
    )
    memory_note = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (CPU)"
    b.add(
        task, "ntm", config.model.steps, "peak_memory_gib", peak_memory_gib(device), **{**common, "note": memory_note}
    )
    return model, step, task


def section_syncs(b: Bench, setup: tuple[nn.Module, Callable, str] | None) -> None:
    """(e) One training step under ``torch.cuda.set_sync_debug_mode``: pass, or the synchronising calls."""
    device = b.device
    if device.type != "cuda":
        b.add(
            "t2i training step under torch.cuda.set_sync_debug_mode('error')",
            "ntm",
            None,
            "sync_free",
            None,
            skipped="skipped-on-cpu",
            note="skipped-on-cpu: sync debug mode is CUDA only",
        )
        return
    model, step, task = setup if setup is not None else t2i_setup(b)[:3]
    step()  # warm: compilation and first-call allocations are not the steady state
    sync(device)
    error = None
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
    except RuntimeError as e:
        error = str(e).splitlines()[0] if str(e) else repr(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(device)
    syncs = sorted(
        {f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught if "synchroniz" in str(w.message)}
    )
    b.add(
        f"{task}: one step under set_sync_debug_mode",
        "ntm",
        None,
        "sync_free",
        float(error is None and not syncs),
        error=error,
        syncs=syncs,
        sync_count=len(syncs),
    )


def sd3_recipe(s: Sizes) -> dict[str, Any]:
    """The fine-tuning recipe of ``examples/finetune_diffusers`` (its SD3 config): model, loss and train sections,
    with the smoke run's smaller transporter."""
    recipe = json.loads((FINETUNE_CONFIGS / s.sd3_recipe).read_text())
    recipe["model"]["transporter"] = {**recipe["model"]["transporter"], **s.sd3_transporter}
    return recipe


def sd3_transformer(s: Sizes) -> nn.Module:
    """A random ``diffusers.SD3Transformer2DModel`` of the sizes of (f) (float32, on the CPU)."""
    import diffusers

    width = s.sd3_heads * s.sd3_head_dim
    return diffusers.SD3Transformer2DModel(
        sample_size=s.sd3_latent[1],
        patch_size=2,
        in_channels=s.sd3_latent[0],
        out_channels=s.sd3_latent[0],
        num_layers=s.sd3_layers,
        attention_head_dim=s.sd3_head_dim,
        num_attention_heads=s.sd3_heads,
        joint_attention_dim=s.sd3_joint_dim,
        caption_projection_dim=width,
        pooled_projection_dim=s.sd3_pooled_dim,
    )


def section_sd3(b: Bench, reserve: float = 0.0) -> None:
    """(f) Fine-tuning throughput of an NTM from a random ``SD3Transformer2DModel`` (the recipe of
    ``examples/finetune_diffusers``) against flow matching on the same backbone. With a deadline
    (``--time-budget``) the second method is not started once fewer than ``reserve`` seconds are left."""
    s, device = b.sizes, b.device
    try:
        import diffusers  # noqa: F401 (an optional extra: gpu_run.sh installs it from .whl)
    except ImportError as e:
        b.add(
            "section (f) SD3 fine-tuning throughput",
            "skipped",
            None,
            "section_skipped",
            1.0,
            reason=f"diffusers is not importable ({e}): pip install diffusers",
        )
        return
    from trajflow.contrib.diffusers import SD3Velocity

    recipe = sd3_recipe(s)
    m, loss_cfg, train_cfg = recipe["model"], recipe["loss"], recipe["train"]
    text_tokens = s.sd3_text_tokens or 77 + recipe["text"]["max_sequence_length"]  # CLIP's 77 + T5's tokens
    latent = s.sd3_latent
    image_tokens = (latent[1] // 2) * (latent[2] // 2)  # SD3's patch size 2
    width = s.sd3_heads * s.sd3_head_dim
    n = s.sd3_batch
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(n, *latent, device=device, generator=g)
    cond = (
        torch.randn(n, text_tokens, s.sd3_joint_dim, device=device, generator=g),
        torch.randn(n, s.sd3_pooled_dim, device=device, generator=g),
    )
    null = (torch.randn(text_tokens, s.sd3_joint_dim), torch.randn(s.sd3_pooled_dim))  # the empty prompt's stand-in
    params = None
    results: dict[str, float] = {}
    task = ""
    for method in ("ntm-fm", "fm"):
        if results and b.deadline is not None and time.perf_counter() >= b.deadline - reserve:
            b.add(
                task,
                method,
                None,
                "section_skipped",
                1.0,
                reason=f"--time-budget: fewer than {reserve:g} s left",
            )
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        backbone = sd3_transformer(s)
        params = sum(p.numel() for p in backbone.parameters())
        task = (
            f"sd3-{s.sd3_label}-finetune: random SD3Transformer2DModel {s.sd3_layers} layers x width {width} "
            f"({params:,} parameters), latents {'x'.join(map(str, latent))} ({image_tokens} tokens) + "
            f"{text_tokens} text tokens, batch {n}, bf16 autocast, gradient checkpointing, AdamW"
        )
        if m["gradient_checkpointing"]:
            backbone.enable_gradient_checkpointing()
        velocity = SD3Velocity(backbone.to(device), null_cond=null, validate_args=False).to(device)
        reference = None
        if method == "ntm-fm":
            model, reference = init_from_flow_matching(
                velocity, transporter_kwargs=dict(m["transporter"]), delta_mean=False, c_min=m["c_min"],
                validate_args=False,
            )  # fmt: skip
            reference = reference.to(device=device, dtype=torch.bfloat16)  # frozen: as the example holds it
            nll = TrajectoryNLL(
                steps=loss_cfg["steps"], t_min=tuple(loss_cfg["t_min"]), shift=loss_cfg["shift"],
                mode=loss_cfg["mode"], cond_drop=loss_cfg["cond_drop"], validate_args=False,
            )  # fmt: skip
            finetune = FinetuneLoss(
                nll, MeanAlignmentLoss(reference), aux_weight=loss_cfg["aux_weight"], decay_fraction=1.0
            )

            def loss_fn(model: nn.Module, x: Tensor, c: Any, finetune: FinetuneLoss = finetune) -> Tensor:
                return finetune(model, (x, c), None, 0, progress=0.0)[0]  # lambda at its start: 2.5

            steps: int | None = loss_cfg["steps"]
        else:
            model, loss_fn, steps = velocity, FlowMatchingLoss(cond_drop=loss_cfg["cond_drop"]), None
        model.to(device).train()
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=train_cfg["lr"],
            weight_decay=train_cfg.get("weight_decay", 0.0),
            fused=device.type == "cuda",
        )
        step = train_step(model, loss_fn, opt, [(x0, cond)], device, clip=train_cfg.get("grad_clip"))
        build_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        times, (loss, _) = timed(step, device, s.sd3_steps, warmup=s.sd3_warmup)
        warm_s = time.perf_counter() - start - sum(times)
        step_s = statistics.median(times)
        ips = n / step_s
        results[method] = ips
        common = dict(
            batch=n,
            params=params,
            model_params=sum(p.numel() for p in model.parameters()),
            tokens=image_tokens,
            text_tokens=text_tokens,
            recipe=f"examples/finetune_diffusers/configs/{s.sd3_recipe}",
        )
        b.add(
            task,
            method,
            steps,
            "train_images_per_s",
            ips,
            step_seconds=step_s,
            all=times,
            warmup_steps=s.sd3_warmup,
            warmup_seconds=warm_s,
            build_seconds=build_s,
            loss=float(loss),
            sd3_config={k: v for k, v in backbone.config.items() if not k.startswith("_")},
            **common,
        )
        memory_note = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (CPU)"
        b.add(task, method, steps, "peak_memory_gib", peak_memory_gib(device), note=memory_note, **common)
        del model, opt, step, velocity, backbone, reference, loss_fn
        free(device)
    if len(results) == 2:
        b.add(
            task,
            "ntm-fm",
            loss_cfg["steps"],
            "throughput_ratio_vs_fm",
            results["ntm-fm"] / results["fm"],
            baseline="fm",
            batch=n,
            params=params,
        )


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 2 minutes), a rehearsal")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    parser.add_argument(
        "--sections", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f (run in the order a,b,c,f,d,e)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="peak bf16 TFLOP/s for MFU (default 790, the reference figures' peak)",
    )
    parser.add_argument("--long-steps", type=int, default=None, help="training steps of section (d)")
    parser.add_argument(
        "--ntm-pair",
        action="store_true",
        help="(a) also times the pair-wise NTM loss (method ntm-pair; one more compile, ~1 minute)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (smoke default: 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed training steps in (a) and calls in (b), (c) (default: 10, 3, 3; smoke 2, 2, 2)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: no section starts after it, and (d) stops early to leave 20 s for (e)",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="write the results file after every section (for runs under an outer timeout)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    sizes = replace(SMOKE if args.smoke else GPU)
    if args.long_steps is not None:
        sizes.long_steps = args.long_steps
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats: expected at least 1")
        sizes.train_steps = sizes.inverse_repeats = sizes.sample_repeats = args.repeats
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cpu":
        sizes.compile = sizes.long_compile = False  # the CPU run is a rehearsal of the code, not of the compiler
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set("abcdef"))
    if unknown:
        parser.error(f"--sections: unknown {unknown}, expected a subset of a,b,c,d,e,f")
    out = args.out or (SMOKE_OUT if args.smoke else RESULTS / "speed.json")

    total = time.perf_counter()
    deadline = None if args.time_budget is None else total + args.time_budget
    b = Bench(device, sizes, args.smoke, deadline)
    print(f"gpu benchmark on {device_string(device)}, torch {torch.__version__}" + (" (smoke)" if args.smoke else ""))
    seconds: dict[str, float] = {}
    setup = None
    steps = [
        ("a", "training throughput and MFU", lambda: section_train(b, args.peak_tflops, args.ntm_pair)),
        ("b", "transporter inverse", lambda: section_inverse(b)),
        ("c", "4-step sampling", lambda: section_sample(b)),
        # (f) before (d): (d) is the elastic section that fills what is left of --time-budget
        ("f", "SD3 fine-tuning throughput", None),
        ("d", "bf16 training stability", None),
        ("e", "host synchronisations", None),
    ]

    def extra() -> dict[str, Any]:
        return {
            "smoke": args.smoke,
            "sections": sections,
            "section_seconds": seconds,
            "total_seconds": time.perf_counter() - total,
            "peak_tflops": args.peak_tflops,
            "flop_formula": FLOP_FORMULA,
            "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(sizes).items()},
            **({} if args.time_budget is None else {"time_budget_seconds": args.time_budget}),
        }

    for key, title, fn in steps:
        if key not in sections:
            continue
        print(f"({key}) {title}", flush=True)
        if deadline is not None and time.perf_counter() >= deadline:
            b.add(
                f"section ({key}) {title}",
                "skipped",
                None,
                "section_skipped",
                1.0,
                reason=f"--time-budget {args.time_budget:g} s spent",
            )
            continue
        start = time.perf_counter()
        try:
            if key == "d":
                setup = section_long(b, reserve=SYNC_RESERVE_SECONDS if "e" in sections else 0.0)
            elif key == "e":
                section_syncs(b, setup)
            elif key == "f":
                section_sd3(b, reserve=SYNC_RESERVE_SECONDS if "e" in sections else 0.0)
            else:
                fn()
        except Exception as e:  # noqa: BLE001 (one failing section must not cost the others' numbers)
            if args.smoke:
                raise
            message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            b.add(f"section ({key}) {title}", "error", None, "section_failed", 1.0, error=message)
            free(device)
        free(device)  # the section's models are gone with its frame
        seconds[key] = time.perf_counter() - start
        print(f"    {seconds[key]:.1f} s", flush=True)
        if args.incremental:
            write_results(out, "speed", b.rows, device=device, extra={**extra(), "complete": False})
    del setup
    free(device)
    final = extra()
    if args.incremental:
        final["complete"] = True
    result = write_results(out, "speed", b.rows, device=device, extra=final)
    print(f"wrote {out} ({len(b.rows)} rows, {final['total_seconds']:.0f} s)")
    if math.isfinite(final["total_seconds"]) and not args.smoke and final["total_seconds"] > 540:
        print("warning: the run took more than 9 minutes", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
