"""Shared plumbing of the benchmark scripts: the results file of ``design.md`` ("Benchmark results format").

Every script writes one JSON file ``benchmarks/results/<name>.json``::

    {"benchmark": "toy", "command": "python benchmarks/toy.py --config full", "commit": "3f2c1e9",
     "dirty": false, "device": "cpu: 2 cores", "torch": "2.13.0+cpu", "created": "2026-11-23T10:00:00Z",
     "rows": [{"task": ..., "method": ..., "steps": ..., "metric": ..., "value": ..., "seed": ..., ...}]}

``dirty`` says whether the working tree had uncommitted changes when the numbers were measured (then
``commit`` is not exactly the code that ran). Files are written atomically (:func:`trajflow.checkpoint.atomic_write`:
a temporary file, then ``os.replace``), so a benchmark killed half-way leaves the previous complete file.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "demo.json"
    >>> payload = write_results(path, "demo", [{"task": "t", "method": "m", "steps": None, "metric": "x",
    ...                                         "value": 1.0, "seed": 0}], command="python demo.py")
    >>> sorted(payload)
    ['benchmark', 'command', 'commit', 'created', 'device', 'dirty', 'rows', 'torch']
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trajflow.checkpoint import atomic_write

__all__ = [
    "ROOT",
    "RESULTS",
    "REQUIRED_ROW_KEYS",
    "git_commit",
    "git_dirty",
    "source_state",
    "device_string",
    "command_line",
    "utc_now",
    "write_results",
    "read_results",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED_ROW_KEYS = ("task", "method", "steps", "metric", "value", "seed")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str:
    """``git rev-parse --short HEAD``, or ``"unknown"`` outside a git checkout."""
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Whether the working tree differs from HEAD (untracked files included)."""
    status = _git("status", "--porcelain")
    return status is None or bool(status)


def source_state() -> tuple[str, bool]:
    """``(commit, dirty)`` of the checkout now: call it when a long benchmark starts, pass it to
    :func:`write_results` as ``source``."""
    return git_commit(), git_dirty()


def device_string(device: torch.device | str | None = None) -> str:
    """``"cpu: N cores"``, prefixed with the GPU's name (``"NVIDIA H100 ... | cpu: 16 cores"``) on CUDA."""
    cpu = f"cpu: {os.cpu_count()} cores"
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} | {cpu}"
    return cpu


def command_line(argv: Iterable[str] | None = None) -> str:
    """The command that ran, as a shell line (``python benchmarks/toy.py --config full``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).is_absolute():
        try:
            argv[0] = str(Path(argv[0]).relative_to(ROOT))
        except ValueError:
            pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def utc_now() -> str:
    """ISO-8601 UTC timestamp to the second, ``2026-11-23T10:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_rows(rows: list[Mapping[str, Any]]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: missing keys {missing} (every row needs {list(REQUIRED_ROW_KEYS)})")
        metric = row["metric"]
        if not isinstance(metric, str) or metric != metric.lower():
            raise ValueError(f"rows[{i}]: metric names are lower-case with their unit, got {metric!r}")


def write_results(
    path: str | os.PathLike,
    benchmark: str,
    rows: list[Mapping[str, Any]],
    *,
    command: str | None = None,
    device: torch.device | str | None = None,
    extra: Mapping[str, Any] | None = None,
    source: tuple[str, bool] | None = None,
) -> dict[str, Any]:
    """Write the results file atomically and return its content.

    Arguments:
        path: Where to write (usually ``RESULTS / f"{benchmark}.json"``).
        benchmark: The benchmark's name.
        rows: One dict per measured number, with at least :data:`REQUIRED_ROW_KEYS`.
        command: The command line (default: :func:`command_line` of this process).
        device: The device the numbers were measured on (for :func:`device_string`).
        extra: More top-level keys (e.g. the config), written after the standard ones.
        source: ``(commit, dirty)`` read when the benchmark *started* (:func:`source_state`); by default they
            are read now, which misdescribes a long run during which the checkout changed.
    """
    rows = [dict(r) for r in rows]
    _check_rows(rows)
    payload: dict[str, Any] = {
        "benchmark": benchmark,
        "command": command if command is not None else command_line(),
        "commit": source[0] if source else git_commit(),
        "dirty": source[1] if source else git_dirty(),
        "device": device_string(device),
        "torch": torch.__version__,
        "created": utc_now(),
        **dict(extra or {}),
        "rows": rows,
    }
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))  # the library's one atomic writer
    return payload


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results file, checking that it has the standard keys."""
    with open(path, encoding="utf-8") as fh:
        payload = json.load(fh)
    missing = [k for k in ("benchmark", "command", "commit", "device", "created", "rows") if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a benchmark results file, missing keys {missing}")
    _check_rows(payload["rows"])
    return payload
