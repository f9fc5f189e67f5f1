"""Distil a one-pass learned denoiser from a trained text-to-image NTM (NTM §3.4), for the fast sampling path.

    python examples/t2i/distill.py --checkpoint runs/shapes_cpu_smoke --out runs/shapes_cpu_smoke/denoiser \\
        --iters 500 --t-min 0.02 --set batch_size=32 --set depth=2
    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --path fast \\
        --denoiser runs/shapes_cpu_smoke/denoiser --prompt "a large red circle at the top left"

The NTM (an ``ntm`` or ``ntm-fm`` run; EMA weights unless ``--no-ema``) is frozen. Real images and captions of
the run's own dataset give forward trajectories; the NTM's trajectory score denoises them, and a transformer
denoiser learns to map the cleanest latent straight to that target. ``--set field=value`` sets a field of
:class:`trajflow.recipes.t2i.DistillConfig` (``steps``, ``batch_size``, ``lr``, ``width``, ``depth``, ``heads``,
``cond_drop``, ``clip_percentile``, ``seed``, ``checkpoint_every``, ...). Sample with the same ``--t-min`` and
steps. Training goes through the library's Trainer: its checkpoints are in ``OUT/training/checkpoints``, and
``--resume`` continues an interrupted distillation exactly.
"""

from __future__ import annotations

import argparse
import sys

import torch

from trajflow.recipes.t2i import DistillConfig, distill_t2i


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="NTM run folder or step folder (the frozen teacher)")
    p.add_argument("--out", required=True, help="output folder of the denoiser")
    p.add_argument("--iters", type=int, required=True, help="optimizer iterations")
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
            iters=args.iters,
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
    print(f"done: iteration {result.step} of {args.iters} ({result.seconds:.1f} s), mse {last:.4g}")
    print(f"denoiser: {result.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
