"""Distil a one-pass learned denoiser from a trained text-to-image NTM (NTM §3.4), for the fast sampling path.

    python examples/t2i/distill.py --checkpoint runs/shapes_cpu_smoke --out runs/shapes_cpu_smoke/denoiser \\
        --max-steps 500 --t-min 0.02 --set batch_size=32 --set depth=2
    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --path fast \\
        --denoiser runs/shapes_cpu_smoke/denoiser --prompt "a large red circle at the top left"

The NTM (an ``ntm`` or ``ntm-fm`` run; EMA weights unless ``--no-ema``) is frozen. Real images and captions of
the run's own dataset give forward trajectories; the NTM's trajectory score denoises them, and a transformer
denoiser learns to map the cleanest latent straight to that target. ``--set field=value`` sets a field of
:class:`DistillConfig` (``steps``, ``batch_size``, ``lr``, ``width``, ``depth``, ``heads``,
``cond_drop``, ``clip_percentile``, ``seed``, ``checkpoint_every``, ...). Sample with the same ``--t-min`` and
steps. Training goes through the library's Trainer: its checkpoints are in ``OUT/training/checkpoints``, and
``--resume`` continues an interrupted distillation exactly.

This file reads top to bottom: the settings (:class:`DistillConfig`), the Trainer's objective, the result,
:func:`distill_t2i` (the teacher, the loss, the denoiser, the Trainer's run), then the command line. Layout of
``OUT``::

    OUT/config.json, model.safetensors   the denoiser (:func:`~trajflow.denoise.save_denoiser`)
    OUT/distill.json                     the teacher, the settings, the loss history, the time
    OUT/training/                        the Trainer's run: config.json, log.jsonl, checkpoints/
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trajflow.checkpoint import dataclass_from_dict, save_json
from trajflow.denoise import DistillationLoss, TransformerDenoiser, save_denoiser
from trajflow.model import NTM
from trajflow.train import Trainer, TrainerConfig

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.t2i.config import apply_overrides  # noqa: E402
from examples.t2i.data import build_dataset, collate_text_image  # noqa: E402
from examples.t2i.model import load_t2i, load_t2i_config  # noqa: E402
from examples.t2i.objective import TextToImageObjective  # noqa: E402
from examples.t2i.sampling import DEFAULT_DENOISE_T_MIN  # noqa: E402

__all__ = ["DistillConfig", "DistillObjective", "DistillResult", "distill_t2i", "main"]

#: The sub-folder of ``out_dir`` that holds the Trainer's run (checkpoints, log).
TRAINING_DIR = "training"
#: Config fields that may change between a distillation checkpoint and its resumption (how often, not what).
_RESUME_FREE = ("log_every", "checkpoint_every")


@dataclass
class DistillConfig:
    """Settings of :func:`distill_t2i` (``examples/t2i/distill.py --set field=value``).

    Attributes:
        steps: Trajectory steps ``T`` of the teacher's grids (``None``: the run's ``sample.steps``); sample the
            fast path with the same ``T``.
        t_min: The cleanest time ``t_0`` (NTM: 0.02; the fast path samples at it). Must be > 0: at 0 the
            target is the data itself and the teacher's score plays no part.
        batch_size: Real images per iteration (``None``: the run's ``train.batch_size``).
        lr, weight_decay, grad_clip: AdamW and gradient clipping (0: off).
        width, depth, heads: The denoiser transformer (``None``: the run's predictor's).
        cond_drop: Caption dropout (``None``: the run's ``model.cond_drop``), so the denoiser also serves
            the unconditional branch.
        clip_percentile: Gradient clipping of the teacher's score (see
            :func:`~trajflow.denoise.trajectory_score_denoise`).
        seed: Data order, trajectories and initialisation.
        log_every: Iterations between entries of the loss history.
        checkpoint_every: Iterations between training checkpoints (``None``: only the last one), from which
            an interrupted distillation resumes exactly.
    """

    steps: int | None = None
    t_min: float = DEFAULT_DENOISE_T_MIN
    batch_size: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    cond_drop: float | None = None
    clip_percentile: float | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min: expected 0 < t_min < 1 (denoising is a no-op at 0), got {self.t_min!r}")
        for name in ("steps", "batch_size", "width", "depth", "heads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer or null, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every: expected a positive integer, got {self.log_every!r}")
        every = self.checkpoint_every
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every: expected a positive integer or null, got {every!r}")

    @classmethod
    def from_overrides(cls, overrides: list[str], **fields: Any) -> DistillConfig:
        """``fields`` updated by ``"field=value"`` strings (values parsed as JSON); unknown fields raise."""
        return dataclass_from_dict(cls, apply_overrides(fields, overrides), "distill")


class DistillObjective:
    """The :class:`~trajflow.train.Objective` of distillation: a batch of real images and captions ->
    :class:`~trajflow.denoise.DistillationLoss` of the denoiser being trained (the ``model``).

    Arguments:
        loss: The distillation loss around the frozen teacher.
        text: The run's text-to-image objective, used only for its caption features (with the run's cache)
            and its images -> data map (the VAE of a latent run); its own loss is not used.
    """

    loss_name = "mse"

    def __init__(self, loss: Any, text: TextToImageObjective) -> None:
        self.loss, self.text = loss, text

    def __call__(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        x0 = self.text.images_to_data(batch["image"])  # (B, C, H, W)
        cond = self.text.condition(batch["caption"], x0.device)  # ((B, L, D), (B, L))
        return self.loss(model, x0, cond, generator=generator)


@dataclass
class DistillResult:
    """What :func:`distill_t2i` returns.

    Attributes:
        denoiser: The trained denoiser (eval mode).
        path: The folder it was saved to (``out_dir``).
        history: The Trainer's log records of this call (``step``, ``mse``, ``lr``, ...).
        seconds: Seconds of training (data, forward, backward and update).
        step: The iteration reached.
        checkpoint: The Trainer's last checkpoint (to resume from).
    """

    denoiser: nn.Module
    path: Path
    history: list[dict[str, float]]
    seconds: float
    step: int = 0
    checkpoint: Path | None = None


def distill_t2i(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_steps: int,
    config: DistillConfig | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    progress: bool = True,
    resume: bool | str | os.PathLike = False,
    stop_at: int | None = None,
) -> DistillResult:
    """Distil a one-pass :class:`~trajflow.denoise.TransformerDenoiser` from a trained text-to-image NTM.

    The NTM (``"ntm"`` or ``"ntm-fm"`` run; EMA weights by default) is frozen; real images and captions of the
    run's own dataset give forward trajectories whose score-denoised estimates are the targets
    (:class:`~trajflow.denoise.DistillationLoss`, NTM §3.4). The :class:`~trajflow.train.Trainer` trains the
    denoiser for ``max_steps`` optimizer steps with AdamW at the constant rate ``config.lr`` (no warmup, no EMA),
    checkpointing into ``out_dir/training``. Then the denoiser is written with
    :func:`~trajflow.denoise.save_denoiser` into ``out_dir`` (``config.json``, ``model.safetensors``) with a
    ``distill.json`` (the teacher, the settings and the loss history); sample with
    ``generate(..., path="fast")``.

    Arguments:
        checkpoint: The teacher: a run or step folder of an NTM run.
        out_dir: Where the denoiser, ``distill.json`` and ``training/`` go.
        max_steps: Optimizer steps (before 0.3.0: ``iters``).
        config: The settings (:class:`DistillConfig`).
        ema: Distil the teacher's EMA weights (when it saved them).
        device: ``"cpu"``, or a GPU (``"cuda"``): where the Trainer runs.
        encoder: A text encoder to reuse (tests share one); by default the teacher run's.
        progress: Show progress bars.
        resume: ``True``: continue from the newest checkpoint in ``out_dir/training``; a path: from that
            checkpoint; ``False``: start afresh. A checkpoint of another teacher or other settings is refused
            with the differing fields named.
        stop_at: Stop (and checkpoint) after this iteration, as an interruption would.

    Raises:
        ValueError: ``max_steps`` is not a positive integer, the teacher is not an NTM, or the device is not
            the one the Trainer runs on.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
    dc = config or DistillConfig()
    device = torch.device(device)
    out_dir = Path(out_dir)
    teacher_config, folder = load_t2i_config(checkpoint)
    if teacher_config.model.kind == "fm":
        raise ValueError(f"checkpoint: distillation needs an NTM run, {str(folder)!r} is 'fm'")
    trainer = Trainer(
        TrainerConfig(
            max_steps=max_steps,
            batch_size=dc.batch_size or teacher_config.train.batch_size,
            lr=dc.lr,
            min_lr_ratio=1.0,  # a constant rate after no warmup
            warmup_steps=0,
            weight_decay=dc.weight_decay,
            betas=(0.9, 0.999),  # torch's AdamW defaults
            grad_clip=dc.grad_clip,
            ema_decay=0.0,
            seed=dc.seed,
            log_every=dc.log_every,
            checkpoint_every=dc.checkpoint_every or max_steps,
            progress=progress,
            cpu=device.type == "cpu",
        ),
        out_dir / TRAINING_DIR,
    )
    if trainer.device.type != device.type:
        raise ValueError(
            f"device: expected a device the Trainer can use, got {str(device)!r} (it runs on {trainer.device})"
        )
    bundle = load_t2i(checkpoint, ema=ema, device=trainer.device, encoder=encoder)
    if not isinstance(bundle.model, NTM):
        raise ValueError(f"checkpoint: distillation needs an NTM run, {str(bundle.checkpoint)!r} is {bundle.kind!r}")
    cfg, m = bundle.config, bundle.config.model
    teacher = bundle.model.requires_grad_(False).eval()
    steps = dc.steps or cfg.sample.steps
    loss = DistillationLoss(
        teacher,
        steps=steps,
        t_min=(dc.t_min, dc.t_min),
        shift=cfg.shift_for(bundle.data_shape),
        cond_drop=m.cond_drop if dc.cond_drop is None else dc.cond_drop,
        clip_percentile=dc.clip_percentile,
    )
    pc = dataclasses.replace(
        cfg.predictor_config(bundle.encoder.feature_dim, bundle.data_shape),
        width=dc.width or m.width,
        depth=dc.depth or m.depth,
        heads=dc.heads or m.heads,
    )
    torch.manual_seed(dc.seed)  # the same initialisation whatever loading the teacher drew
    denoiser = TransformerDenoiser(pc)
    # Captions -> features as in training (the run's cache); the text objective's own loss is not used.
    as_ntm = dataclasses.replace(cfg, model=dataclasses.replace(m, kind="ntm"))
    text = TextToImageObjective(as_ntm, bundle.encoder, bundle.data_shape, bundle.vae)
    dataset = build_dataset(cfg.data)
    text.prepare(dataset, progress=progress and trainer.is_main)
    run_config = {
        "teacher": {"checkpoint": str(bundle.checkpoint), "ema": ema, "config": cfg.to_dict()},
        "distill": {k: v for k, v in dataclasses.asdict(dc).items() if k not in _RESUME_FREE} | {"steps": steps},
    }
    result = trainer.fit(
        denoiser,
        DistillObjective(loss, text),
        dataset,
        run_config=run_config,
        collate_fn=collate_text_image,
        resume=resume,
        stop_at=stop_at,
    )
    denoiser.eval()
    if trainer.is_main:
        save_denoiser(denoiser, out_dir)
        save_json(
            out_dir / "distill.json",
            {
                "checkpoint": str(bundle.checkpoint),
                "ema": ema,
                "max_steps": max_steps,
                "step": result.step,
                "steps": steps,
                "config": dataclasses.asdict(dc),
                "history": result.history,
                "seconds": result.train_seconds,
                "training": str(out_dir / TRAINING_DIR),
            },
        )
    trainer.accelerator.wait_for_everyone()
    return DistillResult(denoiser, out_dir, result.history, result.train_seconds, result.step, result.checkpoint)


# -- the command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="NTM run folder or step folder (the frozen teacher)")
    p.add_argument("--out", required=True, help="output folder of the denoiser")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--t-min", type=float, default=0.02, help="the cleanest time t_0 (sample at the same value)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DistillConfig field")
    p.add_argument("--no-ema", action="store_true", help="distil the raw weights instead of the EMA")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = DistillConfig.from_overrides(list(args.set), t_min=args.t_min)
        result = distill_t2i(
            args.checkpoint,
            args.out,
            max_steps=args.max_steps,
            config=config,
            ema=not args.no_ema,
            device=args.device,
            resume=args.resume,
        )
    except FileExistsError:  # never retrain over a run silently
        print(f"error: --out {args.out!r} already holds a run; pass --resume to continue it", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.history[-1]["mse"] if result.history else float("nan")
    print(f"done: step {result.step} of {args.max_steps} ({result.seconds:.1f} s), mse {last:.4g}")
    print(f"denoiser: {result.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
