"""Train a text-to-image NTM (or the flow-matching baseline) from a JSON config.

One process (CPU or one GPU)::

    python examples/t2i/train.py --config examples/t2i/configs/shapes_cpu_smoke.json
    python examples/t2i/train.py --config examples/t2i/configs/shapes_cpu_smoke.json --resume   # continue exactly

Several GPUs or machines (DDP or FSDP, see accelerate/*.yaml)::

    accelerate launch --config_file examples/t2i/accelerate/ddp.yaml examples/t2i/train.py \\
        --config examples/t2i/configs/shapes_32_gpu.json

Everything else (data, model, loss, loop, checkpoints) lives in :mod:`trajflow.train`; this file only reads
the command line. ``--set section.field=value`` overrides any config field (values are parsed as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trajflow.recipes.t2i import T2IConfig, train_t2i


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
