r"""Initialise an NTM from a flow-matching model stored at a local path, then fine-tune it.

1. Train a flow-matching velocity model (:class:`trajflow.velocity.MLPVelocity`) on a toy density and
   save it as an "external" checkpoint: ``velocity.safetensors`` + ``velocity_config.json``.
2. Load the checkpoint back *without* trajflow's classes in the loop's view: a loader returns a plain
   ``nn.Module`` called as ``fn(x_t, t, cond) -> (v, hidden)``, which
   :class:`trajflow.velocity.CallableVelocity` adapts to trajflow's calling convention.
3. :func:`trajflow.finetune.init_from_flow_matching` builds the NTM (identity transporter + FM predictor)
   and a frozen reference copy; the script checks that every step of the NTM equals the FM model's
   Gaussian posterior sampler at initialisation.
4. Fine-tune with :class:`trajflow.finetune.FinetuneLoss` (trajectory NLL + cosine-decayed mean
   alignment), report the trajectory NLL and the energy distance of 4-step samples before and after, with
   and without trajectory score denoising.

Usage::

    python examples/finetune/finetune_from_fm.py --out /tmp/fm-checkpoint            # about a minute on a CPU
    python examples/finetune/finetune_from_fm.py --out /tmp/fm-checkpoint --skip-pretrain   # reuse it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from trajflow import MarkovInterpolant, TrajectoryNLL, time_grid
from trajflow.baselines.flow_matching import FlowMatchingLoss
from trajflow.data.toy import toy_density
from trajflow.denoise import sample_denoised
from trajflow.finetune import FinetuneLoss, MeanAlignmentLoss, init_from_flow_matching
from trajflow.metrics import energy_distance
from trajflow.velocity import CallableVelocity, MLPVelocity


def pretrain_and_save(out: Path, density: str, max_steps: int, width: int, depth: int) -> None:
    """Step 1: flow matching on a toy density, saved as safetensors + a JSON config."""
    data = toy_density(density)
    model = MLPVelocity(2, width=width, depth=depth)
    loss_fn = FlowMatchingLoss(cond_drop=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(max_steps):
        loss = loss_fn(model, data.sample(512, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % max(1, max_steps // 4) == 0:
            print(f"flow matching: step {i + 1}/{max_steps} loss {loss.item():.4f}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "velocity.safetensors"))
    config = {"features": 2, "width": width, "depth": depth, "density": density}
    (out / "velocity_config.json").write_text(json.dumps(config, indent=2))
    print(f"saved {out / 'velocity.safetensors'} and {out / 'velocity_config.json'}")


class ExternalVelocity(nn.Module):
    """What an external checkpoint loader hands back: ``fn(x_t, t, cond) -> (v, hidden)``."""

    def __init__(self, net: MLPVelocity) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.net(x_t, t, cond)


def load_external(path: Path) -> tuple[nn.Module, dict]:
    """Step 2: rebuild the model from its JSON config and load the safetensors weights."""
    config = json.loads((path / "velocity_config.json").read_text())
    net = MLPVelocity(config["features"], width=config["width"], depth=config["depth"])
    net.load_state_dict(load_file(str(path / "velocity.safetensors")))
    return ExternalVelocity(net), config


@torch.no_grad()
def check_initial_equivalence(model, velocity: CallableVelocity, grid: Tensor) -> float:
    """Step 3: max |log p_NTM(x_s | x_t) - log N(x_s; A x_t + B (x_t - t v), C^2)| over all steps."""
    dist = model.distribution(grid)
    worst = 0.0
    for k in range(1, grid.shape[0]):
        x_t = 2 * torch.randn(256, 2)
        t, s = grid[k], grid[k - 1]
        v, _ = velocity(x_t, t.expand(256))
        A, B, C = MarkovInterpolant.posterior(t, s)
        gaussian = Independent(Normal(A * x_t + B * (x_t - t * v), C.expand(256, 2)), 1)
        y = gaussian.sample()
        worst = max(worst, float((dist.step(k, x_t).log_prob(y) - gaussian.log_prob(y)).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the flow-matching checkpoint")
    parser.add_argument("--density", default="two_moons")
    parser.add_argument("--fm-max-steps", type=int, default=2000)
    parser.add_argument("--ntm-max-steps", type=int, default=600)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--skip-pretrain", action="store_true", help="load an existing checkpoint from --out")
    args = parser.parse_args()
    torch.manual_seed(0)

    if not args.skip_pretrain:
        pretrain_and_save(args.out, args.density, args.fm_max_steps, args.width, args.depth)
    external, config = load_external(args.out)
    velocity = CallableVelocity(external, event_shape=(2,), hidden_features=config["width"])
    model, reference = init_from_flow_matching(velocity, transporter_kwargs={"transforms": 3})

    grid = time_grid(4, 0.02)
    print(
        f"max |log-density difference| to the FM posterior sampler at init: "
        f"{check_initial_equivalence(model, velocity, grid):.2e}"
    )

    data = toy_density(config["density"])
    test = data.sample(2000, generator=torch.Generator().manual_seed(1))
    eval_nll = TrajectoryNLL(steps=4, t_min=(0.02, 0.02), cond_drop=0.0)

    def report(tag: str) -> None:
        with torch.no_grad():
            nll = float(eval_nll(model, test))
            raw = model.sample((2000,), steps=4, t_min=0.02)
        den = sample_denoised(model.distribution(grid), (2000,))
        print(
            f"{tag}: trajectory NLL {nll:.3f} nats/dim, energy distance {energy_distance(raw, test):.4f} "
            f"(score-denoised {energy_distance(den, test):.4f})"
        )

    report("at initialisation")
    loss_fn = FinetuneLoss(
        TrajectoryNLL(steps=4, cond_drop=0.0), MeanAlignmentLoss(reference), decay_steps=args.ntm_max_steps
    )
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(2)
    for step in range(args.ntm_max_steps):
        total, parts = loss_fn(model, data.sample(256, generator=g), step=step)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, args.ntm_max_steps // 4) == 0:
            print(
                f"fine-tune: step {step + 1}/{args.ntm_max_steps} nll {float(parts['nll']):.3f} "
                f"aux {float(parts['aux']):.4f} lambda {float(parts['lambda']):.2f}"
            )
    report("after fine-tuning")


if __name__ == "__main__":
    main()
