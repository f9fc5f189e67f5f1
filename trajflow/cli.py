"""The ``trajflow`` command (also ``python -m trajflow``).

Each job is a subcommand registered in :data:`SUBCOMMANDS`: a function that adds its arguments to an
argparse sub-parser and returns the function that runs it. Jobs are thin: they turn arguments into a
library config and call the library (``trajflow toy`` calls :func:`trajflow.recipes.toy.run_toy`).

Example:
    $ trajflow toy --density checkerboard --out runs/checkerboard
    $ trajflow toy --density spirals --out runs/spirals --seconds 30 --seed 1
    $ trajflow toy --density spirals --out runs/spirals --seconds 30 --seed 1 --resume
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

Runner = Callable[[argparse.Namespace], int]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


# ============================================================================================== toy
def _add_toy(sub: argparse._SubParsersAction) -> Runner:
    from .data.toy import TOY_DENSITIES
    from .recipes.toy import METHODS, ToyConfig

    defaults = ToyConfig()
    p = sub.add_parser(
        "toy",
        help="train NTM and its baselines on a 2-D toy density; write a figure, metrics.json and checkpoints",
        description=(
            "Train an NTM (zuko NSF transporter + MLP predictor, t_min = 0) and, on the same MLP, data and "
            "budget, flow matching (Euler at --steps and at many steps), the Gaussian-step model and a single "
            "NSF; then write OUT/toy_<density>.png, OUT/metrics.json, OUT/config.json and OUT/<method>/checkpoints/."
        ),
    )
    p.add_argument(
        "--density", default=defaults.density, choices=sorted(TOY_DENSITIES), help="toy density (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="trajectory steps T, and the few-step Euler budget (default: %(default)s)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help=f"optimizer steps per method, the same for every method (default: {defaults.iters})",
    )
    budget.add_argument(
        "--seconds",
        type=positive_float,
        default=None,
        help="wall-clock training seconds per method, instead of --iters",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of everything (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=defaults.threads,
        help="torch CPU threads, recorded in the run; results depend on it, so keep it on --resume "
        "(default: %(default)s)",
    )
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=defaults.test_size,
        help="held-out test points, and samples drawn per method, for the metrics (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help="comma-separated subset of %(default)s (default: all)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=defaults.checkpoint_every,
        help="optimizer steps between checkpoints of each method (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=positive_float,
        default=defaults.checkpoint_minutes,
        help="also checkpoint each method after this many minutes of wall-clock time (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from .recipes.toy import ToyConfig, run_toy

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            p.error(
                f"argument --methods: expected a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}"
            )
        iters = args.iters if args.iters is not None else (None if args.seconds is not None else defaults.iters)
        try:
            cfg = ToyConfig(
                density=args.density,
                steps=args.steps,
                iters=iters,
                seconds=args.seconds,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                device=args.device,
                threads=args.threads,
                checkpoint_every=args.checkpoint_every,
                checkpoint_minutes=args.checkpoint_minutes,
                methods=methods,
                test_size=args.eval_samples,
                sample_size=args.eval_samples,
                progress=not args.quiet,
            )
            result = run_toy(cfg, args.out, resume=args.resume)
        except (ValueError, FileExistsError) as e:
            print(f"trajflow toy: error: {e}", file=sys.stderr)
            return 2
        _print_summary(result.metrics, args.out)
        return 0

    return run


def _print_summary(metrics: dict, out: str) -> None:
    """A small table of the metrics on stdout."""
    head = (
        f"{'method':<16}{'steps':>6}{'energy dist':>13}{'sliced W2^2':>13}{'hist TV':>9}{'in supp':>9}"
        f"{'-ELBO':>9}{'NLL':>9}{'train s':>9}"
    )
    print(head)
    rows = [("data (ref)", metrics["reference"]), *metrics["methods"].items()]
    for name, e in rows:
        steps = "-" if e.get("steps") is None else str(e["steps"])
        tv = f"{e['histogram_tv']:.3f}" if "histogram_tv" in e else "-"
        share = f"{e['support_share']:.3f}" if "support_share" in e else "-"
        elbo = f"{e['elbo_nats_per_dim']:.3f}" if "elbo_nats_per_dim" in e else "-"
        nll = f"{e['nll_nats_per_dim']:.3f}" if "nll_nats_per_dim" in e else "-"
        secs = f"{e['train_seconds']:.0f}" if "train_seconds" in e else "-"
        print(
            f"{name:<16}{steps:>6}{e['energy_distance']:>13.5f}{e['sliced_wasserstein']:>13.5f}{tv:>9}{share:>9}"
            f"{elbo:>9}{nll:>9}{secs:>9}"
        )
    print(
        "(hist TV: total variation of a fine histogram against the exact density, the data row is its noise "
        "floor; in supp: share inside the support; -ELBO and NLL in nats/dim)"
    )
    print(f"(wrote {out}/metrics.json and {out}/toy_{metrics['density']}.png)")


#: Subcommand name -> function that adds its parser and returns its runner. Later jobs (bpd, distill, ...)
#: register here.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], Runner]] = {"toy": _add_toy}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    """The ``trajflow`` parser and the runner of each subcommand."""
    parser = argparse.ArgumentParser(
        prog="trajflow", description="Normalizing Trajectory Models: training jobs, benchmarks and tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    runners = {name: add(sub) for name, add in SUBCOMMANDS.items()}
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trajflow ARGS``; returns the exit status (argparse exits with 2 on bad arguments)."""
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
