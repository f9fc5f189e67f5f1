"""Does another 4-step time grid help the few-step samplers at their start? A probe of the grid shift.

For the few-step benchmark's cached teacher (``benchmarks/fewstep.py``), scores the Fréchet distance of two
samplers on the same 4-step grid, shifted as :func:`trajflow.time_grid` shifts it (``shift`` > 1 spends the
steps at high noise, < 1 at low noise; 1 is uniform, the benchmark's grid):

* ``ntm-init``: the NTM initialised from the teacher under ``RECIPE`` (its posterior sampler: the fine-tuning's
  starting point), sampled to ``T_MIN``;
* ``fm-euler``: the teacher's Euler steps.

No training: both read the teacher as cached. If a shift helped both at the start, the benchmark's equal-time
rows would be run on it; this says whether that is worth doing.

Usage::

    python benchmarks/fewstep_grid_shift.py --config cpu --work runs/fewstep-cpu
    python benchmarks/fewstep_grid_shift.py --config cpu-fashion --work runs/fewstep-cpu-fashion
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewstep  # noqa: E402
from _common import RESULTS, command_line, source_state, write_results  # noqa: E402

from trajflow.baselines.flow_matching import euler_sample  # noqa: E402
from trajflow.finetune import init_from_flow_matching  # noqa: E402

SHIFTS = (0.5, 0.75, 1.0, 1.5, 2.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu", choices=sorted(fewstep.CONFIGS))
    ap.add_argument("--work", type=Path, required=True, help="the few-step benchmark's work folder (its cache)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    source = source_state()
    cfg = fewstep.CONFIGS[args.config]
    state = fewstep.prepare(cfg, args.work)  # sets the config's torch threads
    teacher = state["teacher"].eval()
    tkw = {"patch_size": cfg.patch_size, **fewstep.RECIPE["transporter"]}
    ntm, _ = init_from_flow_matching(teacher, transporter_kwargs=tkw, **fewstep.RECIPE["predictor"])
    ntm.eval()
    n, device = args.samples, torch.device("cpu")
    y = fewstep.labels(cfg, n, device)
    rows = []
    for shift in SHIFTS:
        with torch.no_grad():  # the same noise seed for every shift and sampler
            g = torch.Generator().manual_seed(0)
            ntm_x = ntm.sample((n,) if y is None else (), cond=y, steps=4, t_min=fewstep.T_MIN, shift=shift,
                               guidance=cfg.guidance, generator=g)  # fmt: skip
            noise = torch.randn(n, *teacher.event_shape, generator=torch.Generator().manual_seed(0))
            fm_x = euler_sample(teacher, noise, 4, cond=y, guidance=cfg.guidance, shift=shift)
        for method, x in (("ntm-init", ntm_x), ("fm-euler", fm_x)):
            fd = state["metrics"].all(x)["frechet_distance"]
            rows.append({"task": cfg.dataset, "method": method, "steps": 4, "shift": shift,
                         "metric": "frechet_distance", "value": fd, "seed": 0, "samples": n})  # fmt: skip
            print(f"shift {shift}: {method} FD {fd:.1f}", flush=True)
    key = fewstep.results_key(dataclasses.asdict(cfg))  # the data set, and the teacher where not the transformer
    name = "fewstep_grid_shift" + ("" if key == "mnist" else f"-{key}")
    out = args.out or RESULTS / f"{name}.json"
    extra = {"config_name": args.config, "guidance": cfg.guidance, "t_min": fewstep.T_MIN}
    write_results(out, "fewstep_grid_shift", rows, command=command_line(), source=source, device="cpu", extra=extra)
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
