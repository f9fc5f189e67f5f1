"""Train a text-to-image NTM (or the flow-matching baseline) from a JSON config.

One process (CPU or one GPU)::

    python examples/t2i/train.py --config examples/t2i/configs/shapes_cpu_smoke.json
    python examples/t2i/train.py --config examples/t2i/configs/shapes_cpu_smoke.json --resume   # continue exactly

Several GPUs or machines (DDP or FSDP, see accelerate/*.yaml)::

    accelerate launch --config_file examples/t2i/accelerate/ddp.yaml examples/t2i/train.py \\
        --config examples/t2i/configs/shapes_32_gpu.json

``--set section.field=value`` overrides any config field (values are parsed as JSON).

This file reads top to bottom: :func:`train_t2i` builds what the config names (the encoder, the VAE, the data,
the model and its objective, from the modules beside it) and hands them to the library's
:class:`~trajflow.train.Trainer` (loop, checkpoints, exact resumption), then writes a sample grid; ``main`` is
the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from trajflow.nn import count_parameters
from trajflow.train import Trainer, TrainResult

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.t2i.config import RESUME_IGNORED, T2IConfig  # noqa: E402
from examples.t2i.data import build_dataset, collate_text_image  # noqa: E402
from examples.t2i.model import build_model, init_ntm_from_fm, load_t2i  # noqa: E402
from examples.t2i.objective import TextToImageObjective  # noqa: E402
from examples.t2i.sampling import save_image_grid  # noqa: E402
from examples.t2i.text import build_text_encoder  # noqa: E402
from examples.t2i.vae import VAE, data_shape  # noqa: E402

__all__ = ["train_t2i", "main"]


def train_t2i(
    config: T2IConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike = False,
    stop_at: int | None = None,
    encoder: Any = None,
) -> TrainResult:
    """Train a text-to-image model as ``config`` says, in ``out_dir``; writes a sample grid at the end.

    Arguments:
        config: The run.
        out_dir: Output folder (``checkpoints/``, ``config.json``, ``log.jsonl``, ``samples/``).
        resume: See :meth:`Trainer.fit`; without it, an ``out_dir`` that already holds a run is refused
            (``FileExistsError``) before anything is built or written.
        stop_at: Stop (and checkpoint) after this step; the schedule still ends at ``train.max_steps``.
        encoder: A text encoder to reuse (tests share one); by default built from ``config.text``.
    """
    trainer = Trainer(config.train, out_dir)
    trainer.check_out_dir(resume)  # before the encoder, the data and the captions: a refusal costs nothing
    encoder = encoder if encoder is not None else build_text_encoder(config.text, trainer.device)
    vae = VAE(config.vae, trainer.device, config.vae_scale) if config.vae else None
    shape = data_shape(config, vae)
    dataset = build_dataset(config.data)
    if config.model.kind == "ntm-fm":
        # The reference lives in the objective only: outside the trained module, its optimizer, EMA and checkpoints.
        model, reference = init_ntm_from_fm(config, encoder, shape, vae=vae, device=trainer.device)
        objective = TextToImageObjective(config, encoder, shape, vae, reference=reference)
    else:
        model = build_model(config, encoder.feature_dim, shape)
        objective = TextToImageObjective(config, encoder, shape, vae)
    n_caps = objective.prepare(dataset, progress=trainer.is_main and config.train.progress)
    n_params = count_parameters(model)
    trainer.print(
        f"t2i: {config.model.kind} with {n_params / 1e6:.2f}M parameters on {shape}; data {dataset!r}"
        + (f"; {n_caps} captions encoded" if n_caps else "")
        + f"; {trainer.world_size} process(es) on {trainer.device} ({trainer.accelerator.distributed_type.value})"
    )
    result = trainer.fit(
        model,
        objective,
        dataset,
        run_config=config.to_dict(),
        resume_ignore=RESUME_IGNORED,
        collate_fn=collate_text_image,
        resume=resume,
        stop_at=stop_at,
    )
    k = config.sample.grid_prompts
    if k > 0 and trainer.is_main and result.checkpoint is not None and not isinstance(dataset, IterableDataset):
        bundle = load_t2i(result.checkpoint, device=trainer.device, encoder=encoder, vae=vae)
        captions = [dataset[i]["caption"] for i in range(min(k, len(dataset)))]
        images = bundle.generate(captions, seed=config.train.seed)
        path = save_image_grid(images, Path(out_dir) / "samples" / f"{result.checkpoint.name}.png")
        (path.with_suffix(".txt")).write_text("\n".join(captions) + "\n")
        trainer.print(f"samples: {path}")
    trainer.accelerator.wait_for_everyone()
    return result


# -- the command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a JSON config (examples/t2i/configs/*.json)")
    p.add_argument(
        "--out", default=None, help="output folder (default: runs/<config name>); one holding a run needs --resume"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="continue from the newest checkpoint in --out, or from the given checkpoint folder",
    )
    p.add_argument("--vae", default=None, help="a LOCAL folder with a diffusers AutoencoderKL: train in its latents")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) after this step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"vae={json.dumps(args.vae)}"] if args.vae else [])
    try:
        config = T2IConfig.from_json(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / config.name
    try:
        result = train_t2i(config, out, resume=args.resume, stop_at=args.stop_at)
    except ImportError as e:  # e.g. --vae without diffusers: the message says what to install
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError:  # never retrain over a run silently
        print(
            f"error: --out {str(out)!r} already holds a run; pass --resume to continue it, or choose another --out",
            file=sys.stderr,
        )
        return 2
    print(
        f"done: step {result.step}, {config.model.kind} loss {result.loss:.4f}, "
        f"{result.images_per_s:.1f} images/s, checkpoint {result.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
