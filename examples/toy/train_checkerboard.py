"""Train NTM (T = 4) and its baselines on the checkerboard, then print the metrics.

The same job as ``trajflow toy --density checkerboard --out runs/checkerboard``; this script shows the
library calls behind it. Everything (models, training through :class:`trajflow.train.Trainer`, evaluation,
figure) lives in :mod:`trajflow.recipes.toy`.

    python examples/toy/train_checkerboard.py --out runs/checkerboard [--iters 2000] [--resume]
"""

from __future__ import annotations

import argparse
import json

from trajflow.recipes.toy import ToyConfig, run_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/checkerboard", help="output folder")
    parser.add_argument("--iters", type=int, default=ToyConfig.iters, help="optimizer steps per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue every method from its last checkpoint in --out")
    args = parser.parse_args()

    config = ToyConfig(density="checkerboard", steps=4, iters=args.iters, seed=args.seed)
    result = run_toy(config, args.out, resume=args.resume)
    for label, entry in result.metrics["methods"].items():
        scores = ("distance", "wasserstein", "_tv", "_share", "per_dim")  # sample scores and likelihoods
        numbers = {k: round(v, 4) for k, v in entry.items() if k.endswith(scores)}
        print(label, json.dumps(numbers))
    print(f"figure: {args.out}/toy_checkerboard.png")


if __name__ == "__main__":
    main()
