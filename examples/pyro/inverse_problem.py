"""A trained NTM as the prior of an inverse problem, solved with Pyro (SVI with AutoNormal, and NUTS).

We observe one noisy coordinate of a 2-D point, y = x0[0] + N(0, noise^2), and infer the posterior over the
whole trajectory, p(x_0, ..., x_T | y) ∝ p_θ(x_0, ..., x_T) p(y | x_0), where p_θ is an NTM trained on the
two-moons density. Inference runs on the trajectory site itself and, with --noise-space, also on the
standard normal noise that generates it (trajflow.contrib.pyro.TrajectoryNoiseReparam). Both are compared
with the exact posterior obtained by importance-resampling prior draws (cheap in 2-D).

    python examples/pyro/inverse_problem.py --out runs/pyro                  # train, infer, plot
    python examples/pyro/inverse_problem.py --out runs/pyro --model runs/pyro/model   # reuse the model
    python examples/pyro/inverse_problem.py --out /tmp/pyro-smoke --smoke    # tiny sizes, seconds

Outputs in --out: model/ (a pretrained folder, unless --model), posterior.png and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from torch.utils.data import TensorDataset

import trajflow
from trajflow.checkpoint import load_json, save_json
from trajflow.contrib.pyro import TrajectoryNoiseReparam, importance_resample, to_pyro, trajectory_from_noise
from trajflow.data.toy import toy_density
from trajflow.metrics import energy_distance
from trajflow.train import Trainer, TrainerConfig

# -- the prior: a toy NTM -------------------------------------------------------------------------------------


def build_ntm(width: int, depth: int) -> trajflow.NTM:
    """A 2-D NTM: a zuko NSF transporter and a residual-MLP predictor (the toy job's architecture)."""
    transporter = trajflow.transporters.ZukoTransporter(2, transforms=2, hidden_features=(64, 64), bins=16)
    predictor = trajflow.predictors.MLPPredictor(2, width=width, depth=depth, time_features=32)
    return trajflow.NTM(transporter, predictor)


def train_ntm(model: trajflow.NTM, args: argparse.Namespace, out: Path) -> float:
    """Fit the NTM to the density by the exact trajectory NLL (t_min = 0, so that x_0 is the data) through the
    library's Trainer: AdamW, cosine decay to 1% of the peak rate, gradient clipping; returns the last loss."""
    nll = trajflow.TrajectoryNLL(steps=args.levels, t_min=(0.0, 0.0), cond_drop=0.0)
    points = toy_density(args.density).sample(65_536, generator=torch.Generator().manual_seed(args.seed))

    def objective(model: trajflow.NTM, batch: list[torch.Tensor], generator: torch.Generator, step: int):
        return nll(model, batch[0], generator=generator)

    config = TrainerConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=3e-3,
        warmup_steps=0,
        min_lr_ratio=0.01,
        ema_decay=0.0,  # the cosine decay ends on a usable model
        seed=args.seed,
        log_every=max(1, args.max_steps // 10),
        checkpoint_every=args.max_steps,
        progress=args.verbose,
        cpu=True,
    )
    # resume=True: a rerun into the same --out continues (or just reloads) its training instead of being refused
    return Trainer(config, out / "training").fit(model, objective, TensorDataset(points), resume=True).loss


# -- the inverse problem as a Pyro model ----------------------------------------------------------------------


def inverse_problem(prior, y: torch.Tensor, noise: float) -> torch.Tensor:
    """traj ~ p_θ (the NTM), y ~ N(traj[0, 0], noise^2): one coordinate of the clean level x_0 is observed."""
    traj = pyro.sample("traj", prior)  # (T + 1, 2), one latent trajectory
    pyro.sample("y", dist.Normal(traj[..., 0, 0], noise), obs=y)
    return traj


def run_svi(model, prior, y, args, label: str) -> tuple[torch.Tensor, list[float], float]:
    """Fit an AutoNormal guide; return posterior trajectories, the loss curve and the seconds spent."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = AutoNormal(model, init_loc_fn=init_to_sample, init_scale=0.1)
    svi = SVI(
        model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / args.svi_steps)}),
        Trace_ELBO(num_particles=args.particles, vectorize_particles=True),
    )
    start, losses = time.perf_counter(), []
    for step in range(args.svi_steps):
        losses.append(svi.step(prior, y, args.noise))
        if args.verbose and (step + 1) % max(1, args.svi_steps // 5) == 0:
            print(f"  svi {label} step {step + 1}: loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    predictive = Predictive(model, guide=guide, num_samples=args.samples, return_sites=["traj"], parallel=True)
    with torch.no_grad():
        traj = predictive(prior, y, args.noise)["traj"]
    return traj.reshape(args.samples, *prior.event_shape), losses, seconds


def run_nuts(model, prior, y, args, site: str) -> tuple[torch.Tensor, dict, float]:
    """Draw posterior samples of ``site`` with NUTS; return them, acceptance diagnostics and the seconds spent."""
    pyro.set_rng_seed(args.seed)
    kernel = NUTS(model, init_strategy=init_to_sample, max_tree_depth=args.tree_depth)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup, disable_progbar=not args.verbose)
    start = time.perf_counter()
    mcmc.run(prior, y, args.noise)
    seconds = time.perf_counter() - start
    summary = mcmc.diagnostics()[site]
    return mcmc.get_samples()[site], {k: float(v.mean()) for k, v in summary.items()}, seconds


# -- the report -------------------------------------------------------------------------------------------------


def summary(x0: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Posterior mean and std of the unobserved coordinate, the mass above 0, and the energy distance."""
    return {
        "mean_x0_1": float(x0[:, 1].mean()),
        "std_x0_1": float(x0[:, 1].std()),
        "upper_mode_mass": float((x0[:, 1] > 0).double().mean()),
        "energy_distance_to_reference": energy_distance(x0, reference),
    }


def plot(path: Path, prior_x0, results: dict, y: float, noise: float, losses: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prior p(x0)", prior_x0), *results.items()]
    cols = math.ceil((len(panels) + 2) / 2)
    fig, axes = plt.subplots(2, cols, figsize=(3.3 * cols, 6.2), constrained_layout=True)
    axes = axes.flatten()
    for ax, (name, x0) in zip(axes, panels, strict=False):
        ax.scatter(x0[:, 0], x0[:, 1], s=2, alpha=0.35, color="tab:gray" if name.startswith("prior") else "tab:blue")
        ax.axvspan(y - 2 * noise, y + 2 * noise, color="tab:orange", alpha=0.15)
        ax.set(xlim=(-3.5, 3.5), ylim=(-2.2, 2.2), title=name, aspect="equal")
    ax = axes[len(panels)]
    bins = torch.linspace(-2.2, 2.2, 45)
    for name, x0 in results.items():
        ax.hist(x0[:, 1], bins=bins, density=True, histtype="step", label=name)
    ax.set(title="posterior of the unobserved x0[1]", xlabel="x0[1]")
    ax.legend(fontsize=7)
    ax = axes[len(panels) + 1]
    for name, curve in losses.items():
        ax.plot(curve, lw=0.8, label=name)
    ax.set(title="SVI loss (-ELBO, nats)", xlabel="step")
    ax.legend(fontsize=7)
    for ax in axes[len(panels) + 2 :]:
        ax.axis("off")
    fig.suptitle(f"NTM prior; observed y = x0[0] + N(0, {noise}²) = {y} (orange: y ± 2σ)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pyro", help="output folder")
    parser.add_argument("--model", default=None, help="the model/ folder of an earlier run (skips training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--density", default="two_moons", help="a name of trajflow.data.toy.TOY_DENSITIES")
    parser.add_argument("--levels", type=int, default=4, help="trajectory steps T of the NTM")
    parser.add_argument("--max-steps", type=int, default=1500, help="optimizer steps of the NTM")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--y", type=float, default=0.0, help="the observed value of x0[0]")
    parser.add_argument("--noise", type=float, default=0.2, help="std of the observation noise")
    parser.add_argument("--steps", "--svi-steps", dest="svi_steps", type=int, default=1500, help="SVI steps")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per SVI step")
    parser.add_argument("--warmup", type=int, default=300, help="NUTS warmup steps")
    parser.add_argument("--samples", type=int, default=1000, help="posterior samples per method")
    parser.add_argument("--tree-depth", type=int, default=6, help="NUTS max tree depth")
    parser.add_argument("--draws", type=int, default=200_000, help="prior draws of the importance reference")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for small tensors)")
    parser.add_argument(
        "--noise-space",
        action="store_true",
        help="also infer on the trajectory's standard normal noise (TrajectoryNoiseReparam)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script, not results)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.svi_steps, args.particles = 20, 128, 20, 2
        args.warmup, args.samples, args.tree_depth, args.draws = 10, 20, 3, 2000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    if args.model:
        # A pretrained folder (config JSON + safetensors: nothing is unpickled) and what the prior was fitted to.
        ntm = trajflow.NTM.from_pretrained(args.model)
        fitted = load_json(Path(args.model) / "prior.json")
        args.density, args.levels = fitted["density"], fitted["levels"]
    else:
        ntm = build_ntm(*((32, 1) if args.smoke else (128, 3)))  # (width, depth) of the predictor
        start = time.perf_counter()
        train_loss = train_ntm(ntm, args, out)
        timings["train"] = time.perf_counter() - start
        print(f"trained the NTM: {args.max_steps} steps, final loss {train_loss:.3f} nats/dim")
        ntm.save_pretrained(out / "model")
        save_json(out / "model" / "prior.json", {"density": args.density, "levels": args.levels})
    ntm.eval().requires_grad_(False)  # the prior is fixed: Pyro only learns the guide's parameters
    prior = to_pyro(ntm.distribution(trajflow.time_grid(args.levels)))
    y = torch.tensor(args.y)

    # The reference: exact posterior draws (up to Monte Carlo error) by importance-resampling prior draws.
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    prior_traj = prior.sample((args.samples,), generator=generator)
    reference, ess = importance_resample(
        prior,
        lambda traj: dist.Normal(traj[:, 0, 0], args.noise).log_prob(y),
        args.draws,
        args.samples,
        generator=generator,
    )
    timings["importance"] = time.perf_counter() - start
    results = {"importance (reference)": reference[:, 0]}

    noise_model = pyro.poutine.reparam(inverse_problem, config={"traj": TrajectoryNoiseReparam()})
    losses, diagnostics = {}, {}
    params = [("trajectory", inverse_problem)] + ([("noise", noise_model)] if args.noise_space else [])
    for param, model in params:
        traj, losses[f"SVI, {param}"], timings[f"svi_{param}"] = run_svi(model, prior, y, args, param)
        results[f"SVI AutoNormal ({param})"] = traj[:, 0]
        site = "traj" if param == "trajectory" else "traj_noise"
        samples, diagnostics[param], timings[f"nuts_{param}"] = run_nuts(model, prior, y, args, site)
        with torch.no_grad():
            traj = samples if param == "trajectory" else trajectory_from_noise(prior, samples)
        results[f"NUTS ({param})"] = traj[:, 0]
        print(f"{param}: SVI {timings[f'svi_{param}']:.0f} s, NUTS {timings[f'nuts_{param}']:.0f} s")

    ref_x0 = results["importance (reference)"]
    metrics = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "verbose")},
        "svi_final_loss": {name: sum(curve[-100:]) / len(curve[-100:]) for name, curve in losses.items()},
        "importance_effective_sample_size": ess,
        "methods": {name: summary(x0, ref_x0) for name, x0 in results.items()},
        "nuts_diagnostics": diagnostics,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot(out / "posterior.png", prior_traj[:, 0], results, args.y, args.noise, losses)
    for name, entry in metrics["methods"].items():
        print(f"{name:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in entry.items()))
    print(f"wrote {out / 'posterior.png'} and {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
