"""Evaluation of one trained toy method: held-out likelihoods and sample distances to held-out data."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import Tensor, nn

from examples.toy.config import DIMS, METHODS, ToyConfig
from trajflow.baselines.flow_matching import euler_sample
from trajflow.data.toy import toy_density
from trajflow.metrics import energy_distance, histogram_distance, sliced_wasserstein
from trajflow.nn import count_parameters
from trajflow.process import MarkovInterpolant, time_grid

__all__ = [
    "evaluate_method",
    "distances",
    "HISTOGRAM_EDGES",
    "SEED_TEST",
    "SEED_SAMPLE",
    "SEED_EVAL",
    "SEED_REFERENCE",
]

# Offsets of the seeds of the independent random streams of one run, so that e.g. the test set never
# overlaps the training data (seeded by the seed itself) and every method is evaluated on the same points.
SEED_TEST, SEED_SAMPLE, SEED_EVAL, SEED_REFERENCE = 10_007, 20_011, 30_013, 40_009

#: The grid of the histogram distance, the same for both coordinates: 36 bins 0.25 wide on [-4.5, 4.5], fine
#: enough to see a blur of the densities' noise (std 0.08-0.2), coarse enough that 5,000 samples put a few
#: per occupied bin, and aligned with the checkerboard's squares (6 x 6 bins each).
HISTOGRAM_EDGES = torch.linspace(-4.5, 4.5, 37, dtype=torch.float64)


@functools.cache
def _bin_masses(density: str) -> Tensor:
    """The density's exact mass in every bin of :data:`HISTOGRAM_EDGES` (about 1 s for the slowest, once)."""
    return toy_density(density).bin_masses(HISTOGRAM_EDGES)


def distances(samples: Tensor, test: Tensor, density: str) -> dict[str, float]:
    """The sample distances of ``samples`` ``(n, 2)``: to the held-out ``test`` points, and to the toy
    ``density`` itself.

    - ``energy_distance``: unbiased energy distance to ``test`` (data units).
    - ``sliced_wasserstein``: squared sliced Wasserstein-2 to ``test``, 256 directions (squared data units).
    - ``histogram_tv``: :func:`trajflow.metrics.histogram_distance` of ``samples`` to the density's exact
      bin masses on :data:`HISTOGRAM_EDGES` (0 to 1). The two above see large-scale mass; this one sees a
      blur, a bridge or a pile-up at the scale of the bins.
    - ``support_share``: the share of ``samples`` inside the support, only for a density with a bounded one
      (checkerboard).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> d = toy_density("checkerboard")
        >>> x, test = d.sample(2000, generator=g), d.sample(2000, generator=g)
        >>> sorted(distances(x, test, "checkerboard"))
        ['energy_distance', 'histogram_tv', 'sliced_wasserstein', 'support_share']
        >>> distances(x, test, "checkerboard")["support_share"]
        1.0
    """
    # The unbiased (U-statistic) energy distance estimates the population distance, so a model that matches
    # the data reads ~0 (+- sampling noise) instead of the O(1/n) floor of the V-statistic; that keeps
    # ratios between good models meaningful.
    out = {
        "energy_distance": energy_distance(samples, test, unbiased=True),
        "sliced_wasserstein": sliced_wasserstein(samples, test, projections=256),
        "histogram_tv": histogram_distance(samples, _bin_masses(density), HISTOGRAM_EDGES),
    }
    if toy_density(density).bounded_support:
        out["support_share"] = float(toy_density(density).in_support(samples).double().mean())
    return out


@torch.no_grad()
def evaluate_method(
    method: str, model: nn.Module, cfg: ToyConfig, test: Tensor
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Likelihoods on ``test`` and sample distances to it for one trained method.

    Returns:
        ``(entries, samples)``: ``entries`` maps a label (``"ntm"``, ``"fm-euler-4"``, ...) to its metrics
        (``method``, ``steps`` and the numbers), ``samples`` maps the same labels to ``(sample_size, 2)``
        CPU samples; for NTM and the Gaussian-step model ``samples["<label>/trajectory"]`` holds the whole
        generated trajectories ``(sample_size, T + 1, 2)``, level 0 the cleanest.
    """
    device = torch.device(cfg.device)
    test_dev = test.to(device)
    n = cfg.sample_size
    reference = test[:n]  # the distances' reference: its own size sets their cost and their noise
    gen = torch.Generator(device).manual_seed(cfg.seed + SEED_EVAL)
    entries: dict[str, dict[str, Any]] = {}
    samples: dict[str, Tensor] = {}
    if method in ("ntm", "gaussian"):
        grid = time_grid(cfg.steps, cfg.t_min, cfg.shift, device=device)
        dist = model.distribution(grid)
        elbo, traj_nll = [], []
        process = MarkovInterpolant()
        for chunk in test_dev.split(2000):
            elbo.append(dist.elbo(chunk, num_samples=cfg.elbo_samples, generator=gen))
            traj = process.sample(chunk, grid, generator=gen)
            traj_nll.append(-dist.log_prob(traj))
        torch.manual_seed(cfg.seed + SEED_SAMPLE)  # the predictor chain draws from the global generator
        t0 = time.perf_counter()
        trajectory = dist.sample((n,))
        sample_seconds = time.perf_counter() - t0
        x = trajectory[:, 0].cpu()
        entries[method] = {
            "method": method,
            "steps": cfg.steps,
            # -ELBO / D: an upper bound on the NLL of the data, comparable with the NSF's exact NLL.
            "elbo_nats_per_dim": float(-torch.cat(elbo).mean()) / DIMS,
            # -log p(x_{t_0}, ..., x_{t_T}) / ((T + 1) D) of forward trajectories of test points: the training
            # loss, on held-out data.
            "trajectory_nll_nats_per_dim": float(torch.cat(traj_nll).mean()) / ((cfg.steps + 1) * DIMS),
            "sample_seconds": sample_seconds,
            **distances(x, reference, cfg.density),
        }
        samples[method] = x
        samples[f"{method}/trajectory"] = trajectory.cpu()
    elif method == "fm":
        noise = torch.randn(n, DIMS, generator=gen, device=device)
        for k in dict.fromkeys((cfg.steps, cfg.fm_steps_many)):
            t0 = time.perf_counter()
            x = euler_sample(model, noise, k, shift=cfg.shift).cpu()
            label = f"fm-euler-{k}"
            entries[label] = {
                "method": "fm-euler",
                "steps": k,
                "sample_seconds": time.perf_counter() - t0,
                **distances(x, reference, cfg.density),
            }
            samples[label] = x
    elif method == "nsf":
        flow = model()
        nll = torch.cat([-flow.log_prob(chunk) for chunk in test_dev.split(2000)])
        torch.manual_seed(cfg.seed + SEED_SAMPLE)
        t0 = time.perf_counter()
        x = flow.sample((n,)).cpu()
        entries[method] = {
            "method": "nsf",
            "steps": None,
            "nll_nats_per_dim": float(nll.mean()) / DIMS,
            "sample_seconds": time.perf_counter() - t0,
            **distances(x, reference, cfg.density),
        }
        samples[method] = x
    else:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    for entry in entries.values():
        entry["params"] = count_parameters(model)
    return entries, samples
