r"""Train a small NTM on sklearn's 8x8 digits and report its test bits/dim (an IWAE and an ELBO bound).

The whole method is in the library; this script only wires it up:

* data: :func:`trajflow.data.images.load_digits` (integers 0..16, ``levels = 17``);
* model: :class:`trajflow.NTM` = :class:`TransformerTransporter` + :class:`TransformerPredictor`, T = 4
  (``--method gaussian``: :func:`trajflow.baselines.gaussian_step_model`, the same predictor without a
  transporter);
* training: :class:`trajflow.train.Trainer` on :class:`trajflow.TrajectoryNLL` with ``t_min=(0, 0)`` on
  fresh uniform dequantisations (:func:`trajflow.likelihood.dequantize`), so that the cleanest level is the
  data itself; ``--time-budget`` trains for a wall-clock budget (``TrainerConfig.time_budget``) instead;
* evaluation: :func:`trajflow.likelihood.elbo_bits_per_dim` with ``bound="both"``: the importance-weighted
  bound (IWAE, K trajectories per image) and the ELBO on the same draws, upper bounds on the discrete NLL.

Pair-mode training (one factor per example) is about 3x cheaper per iteration than trajectory mode and
gave better bounds at equal time in ``benchmarks/bpd.py`` (see ``docs/bpd.md``), which compares these
models with a parameter-matched single flow (:class:`trajflow.baselines.SingleFlow`).

Usage::

    python examples/bpd/digits.py --max-steps 1000 --mode pair
    python examples/bpd/digits.py --time-budget 80 --max-steps 100000 --method gaussian   # 80 s, the schedule over them
"""

from __future__ import annotations

import argparse

import torch

import trajflow
from trajflow.baselines import gaussian_step_model
from trajflow.data.images import load_digits
from trajflow.likelihood import DequantizedObjective, elbo_bits_per_dim
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.train import Trainer, TrainerConfig
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("ntm", "gaussian"), default="ntm")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps (with --time-budget: the most)")
    parser.add_argument("--time-budget", type=float, help="a wall-clock budget in seconds (TrainerConfig.time_budget)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mode", choices=("trajectory", "pair"), default="pair")
    parser.add_argument("--eval-samples", type=int, default=1, help="dequantisation draws per test image")
    parser.add_argument("--iwae-samples", type=int, default=64, help="K, forward trajectories per draw")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    parser.add_argument("--out", default="runs/examples/bpd-digits", help="the Trainer's log and checkpoints")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train, test = load_digits("train"), load_digits("test")
    shape, levels = train.image_shape, train.levels
    predictor = TransformerPredictor(TransformerPredictorConfig(shape, patch_size=2, width=64, heads=4, depth=4))
    if args.method == "ntm":
        transporter_config = TransformerTransporterConfig(shape, patch_size=2, width=64, heads=4, blocks=2)
        model = trajflow.NTM(TransformerTransporter(transporter_config), predictor)
    else:
        model = gaussian_step_model(predictor)
    nll = trajflow.TrajectoryNLL(steps=4, t_min=(0.0, 0.0), mode=args.mode, cond_drop=0.0)
    objective = DequantizedObjective(nll, levels)  # a fresh dequantisation of each batch of uint8 images

    config = TrainerConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.max_steps // 12,  # 8% of the steps, or of the seconds with a time budget
        min_lr_ratio=0.01,
        ema_decay=0.0,
        log_every=50,
        checkpoint_every=args.max_steps,  # the last step only
        time_budget=args.time_budget,
    )
    # resume=True: a rerun into the same --out continues (or just reloads) its training instead of being refused
    result = Trainer(config, args.out).fit(model, objective, train, resume=True)
    print(f"trained {result.step} steps in {result.train_seconds:.0f} s, last NLL {result.loss:.4f} nats/dim")

    model.eval()
    with torch.no_grad():
        bpd = elbo_bits_per_dim(
            model,
            test.images,
            levels,
            steps=4,
            num_samples=args.eval_samples,
            bound="both",
            num_trajectories=args.iwae_samples,
            generator=torch.Generator().manual_seed(1),
        )
    k = args.iwae_samples
    print(
        f"test bits/dim ({levels} levels, {len(test)} images): IWAE-{k} {bpd['iwae'].mean().item():.4f}, "
        f"ELBO {bpd['elbo'].mean().item():.4f}"
    )


if __name__ == "__main__":
    main()
