"""The figure of a toy run: the data and every method's samples, and NTM's trajectory level by level."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trajflow.checkpoint import atomic_write
from trajflow.process import time_grid

if TYPE_CHECKING:
    from examples.toy.train import ToyResult

__all__ = ["plot_toy"]


def plot_toy(result: ToyResult, path: str | os.PathLike, *, bins: int = 160, lim: float = 4.5) -> Path:
    """A PNG of 2-D histograms: the data and every method's samples (top row), and the NTM trajectory level
    by level from noise :math:`x_{t_T}` to :math:`x_{t_0}` (bottom row).

    Each top panel is titled with its scores (:func:`_scores_text`): the energy distance to held-out data,
    which sees large-scale mass, and the histogram total variation against the exact density, which sees
    fine structure (blur, bridges, mass piled at the centres), plus the share of samples inside the support
    where the density has a bounded one. The data panel's scores are the sampling floor.

    Missing methods are skipped. Written atomically (:func:`trajflow.checkpoint.atomic_write`).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    metrics, samples = result.metrics, result.samples
    entries = metrics["methods"]
    top: list[tuple[str, Tensor]] = [(f"data (2nd sample)\n{_scores_text(metrics['reference'])}", samples["data"])]
    fm = sorted((k for k in entries if k.startswith("fm-euler")), key=lambda k: entries[k]["steps"])
    order = ["ntm", *fm, "gaussian", "nsf"]
    names = {"ntm": "NTM", "gaussian": "Gaussian-step", "nsf": "single NSF"}
    for key in order:
        if key in samples:
            e = entries[key]
            steps = f", {e['steps']} steps" if e["steps"] else ""
            label = names.get(key, "FM Euler")
            top.append((f"{label}{steps}\n{_scores_text(e)}", samples[key]))
    traj = samples.get("ntm/trajectory")
    cols = max(len(top), traj.shape[1] if traj is not None else 0)
    rows = 2 if traj is not None else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.8 * rows + 0.6), squeeze=False)
    edges = torch.linspace(-lim, lim, bins + 1)

    def panel(ax, x: Tensor, title: str) -> None:
        ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=[edges.numpy(), edges.numpy()], cmap="magma")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")

    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes[0], top):
        ax.axis("on")
        panel(ax, x, title)
    if traj is not None:
        grid = time_grid(metrics["steps"], metrics["config"]["t_min"], metrics["config"]["shift"])
        for j, k in enumerate(range(traj.shape[1] - 1, -1, -1)):
            axes[1, j].axis("on")
            panel(axes[1, j], traj[:, k], f"NTM $x_{{t_{k}}}$, $t_{k}$ = {float(grid[k]):.2f}")
    fig.suptitle(
        f"{metrics['density']}: NTM vs baselines, same MLP, same budget ({_budget_text(metrics['budget'])})\n"
        "ED: energy distance to held-out data (large-scale mass); TV: total variation of a 36 x 36 histogram "
        "(0.25 bins) against the exact density (fine structure); the data sample's scores are the noise floor",
        fontsize=11,
    )
    fig.tight_layout(h_pad=1.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return path


def _budget_text(budget: dict[str, Any]) -> str:
    if "max_steps" in budget:
        return f"{budget['max_steps']} training steps each"
    return f"{budget['time_budget']:g} training seconds each"


def _scores_text(entry: dict[str, Any]) -> str:
    """A panel's scores: energy distance, histogram TV and (with a bounded support) the share inside it."""
    text = f"ED {entry['energy_distance']:.4f}"
    if "histogram_tv" in entry:
        text += f", TV {entry['histogram_tv']:.3f}"
    if "support_share" in entry:
        text += f"\n{entry['support_share']:.1%} in the support"
    return text
