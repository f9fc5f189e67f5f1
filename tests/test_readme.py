"""The README's ten-line example runs as printed, with what ``import trajflow`` gives."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import trajflow

README = Path(__file__).resolve().parents[1] / "README.md"


def _ten_lines() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The API in ten lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_ten_line_example_runs():
    code = _ten_lines()
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (our own README)
    traj, dist = namespace["traj"], namespace["dist"]
    assert traj.shape == (256, 5, 2)
    assert dist.log_prob(traj).shape == (256,) and bool(torch.isfinite(namespace["loss"]))
    assert dist.sample((16,)).shape == (16, 5, 2)


def test_the_top_level_is_what_the_example_needs_and_nothing_internal():
    names = {n for n in dir(trajflow) if not n.startswith("_")}
    assert set(trajflow.__all__) <= names
    for name in ("NTM", "TrajectoryDistribution", "MarkovInterpolant", "time_grid", "TrajectoryNLL", "Trainer"):
        assert name in trajflow.__all__, name
    assert trajflow.transporters.ZukoTransporter and trajflow.predictors.MLPPredictor
    assert trajflow.__version__ == "0.3.0"
