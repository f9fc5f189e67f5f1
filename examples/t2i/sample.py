"""Sample a trained text-to-image model into PNG grids.

    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --prompt "a large red circle at the top left" \\
        --steps 4 --guidance 3 --seed 0
    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --prompts prompts.txt --n 8

``--checkpoint`` is a run folder (its newest checkpoint) or a step folder. Each grid has one row per prompt
and ``--n`` samples per row (at most ``--rows`` prompts per grid); the prompts are written beside it as
``.txt``. NTM checkpoints sample with ``--steps`` trajectory steps; flow-matching ones with ``--steps`` Euler
(or Heun) steps. The EMA weights are used unless ``--no-ema``.

NTM checkpoints take ``--path``: ``raw`` (default: the transporter's inverse at the cleanest level), ``full``
(inverse at every level + trajectory score denoising, NTM Algorithm 3) or ``fast`` (the learned denoiser of
``distill.py``, ``--denoiser DIR``; no inverse). ``--t-min`` is the cleanest time (default: 0.02 for ``full`` and
``fast``, the config's ``sample.t_min`` for ``raw``); at ``--t-min 0`` denoising changes nothing.

    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --path full --prompt "a large red circle ..."
    python examples/t2i/sample.py --checkpoint runs/shapes_cpu_smoke --path fast \\
        --denoiser runs/shapes_cpu_smoke/denoiser --prompt "a large red circle at the top left"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trajflow.denoise import load_denoiser

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.t2i.model import load_t2i  # noqa: E402
from examples.t2i.sampling import save_image_grid  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or step folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight w (default: sample.guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--rows", type=int, default=8, help="prompts per grid")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler", help="flow-matching checkpoints only")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--path", choices=("raw", "full", "fast"), default="raw", help="NTM sampling path")
    p.add_argument("--t-min", type=float, default=None, help="cleanest time (default: 0.02 for full/fast)")
    p.add_argument("--denoiser", default=None, help="the learned denoiser folder (distill.py) for --path fast")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give at least one --prompt or a --prompts file", file=sys.stderr)
        return 2
    if args.path == "fast" and not args.denoiser:
        print("error: --path fast needs --denoiser DIR (train one with examples/t2i/distill.py)", file=sys.stderr)
        return 2
    bundle = load_t2i(args.checkpoint, ema=not args.no_ema, device=args.device)
    if args.path != "raw" and bundle.kind == "fm":
        print(
            f"error: --path {args.path} needs an NTM checkpoint; flow matching samples with --path raw", file=sys.stderr
        )
        return 2
    denoiser = load_denoiser(args.denoiser).to(args.device) if args.path == "fast" else None
    steps = args.steps or bundle.config.sample.steps
    guidance = args.guidance if args.guidance is not None else bundle.config.sample.guidance
    run = bundle.checkpoint.parent.parent if bundle.checkpoint.parent.name == "checkpoints" else bundle.checkpoint
    out = Path(args.out) if args.out else run / "samples"
    captions = [p for p in prompts for _ in range(args.n)]  # row-major: one row per prompt
    images = bundle.generate(
        captions,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=args.sampler,
        progress=True,
        path=args.path,
        t_min=args.t_min,
        denoiser=denoiser,
    )
    tag = f"{bundle.kind}-{steps}steps-w{guidance:g}-seed{args.seed}"
    if args.path != "raw":
        tag += f"-{args.path}"
    for k, start in enumerate(range(0, len(prompts), args.rows)):
        page = prompts[start : start + args.rows]
        grid = images[start * args.n : (start + len(page)) * args.n]
        path = save_image_grid(grid, out / f"{tag}-{k:03d}.png", nrow=args.n)
        path.with_suffix(".txt").write_text("\n".join(page) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
