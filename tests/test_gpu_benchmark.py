"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code runs end to end on the CPU and writes its rows.

The smoke run is a rehearsal at tiny sizes (seconds on the CPU); its numbers mean nothing, but every
section and every row kind of ``benchmarks/results/speed.json`` must come out, in the standard format.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        out = tmp_path_factory.mktemp("speed") / "speed.json"
        module.main(["--smoke", "--out", str(out)])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("bench_gpu", None)
    return json.loads(out.read_text())


def rows(payload: dict, method: str, metric: str, task: str = "") -> list[dict]:
    """The rows of ``method`` and ``metric`` whose task starts with ``task``."""
    return [
        r for r in payload["rows"] if r["method"] == method and r["metric"] == metric and r["task"].startswith(task)
    ]


def test_smoke_header(smoke: dict) -> None:
    assert smoke["benchmark"] == "speed"
    assert smoke["smoke"] is True
    assert smoke["device"].startswith("cpu")
    assert smoke["torch"]
    for key in ("task", "method", "steps", "metric", "value", "seed", "device", "torch"):
        assert all(key in r for r in smoke["rows"]), key
    assert not rows(smoke, "error", "section_failed")


def test_smoke_training_rows(smoke: dict) -> None:
    for method in ("ntm", "fm-euler"):
        (ips,) = rows(smoke, method, "train_images_per_s", "train ")
        (mfu,) = rows(smoke, method, "mfu")
        assert ips["value"] > 0 and math.isfinite(ips["value"])
        assert 0 < mfu["value"] < 1
        assert mfu["flops_per_image"] > 0 and "6*P*n" in mfu["flop_formula"]
    (ratio,) = rows(smoke, "ntm", "throughput_ratio_vs_fm")
    assert ratio["value"] > 0 and 0 < ratio["flop_bound_ratio"] < 1
    assert ratio["target"] == pytest.approx(0.9 * ratio["flop_bound_ratio"])  # 0.9 of the FLOP-bound ratio
    assert rows(smoke, "ntm", "mfu")[0]["target"] == 0.40
    # The NTM counts T predictor passes and T transporter passes per image: more FLOPs than FM's one pass.
    assert rows(smoke, "ntm", "mfu")[0]["flops_per_image"] > rows(smoke, "fm-euler", "mfu")[0]["flops_per_image"]


def test_smoke_inverse_rows(smoke: dict) -> None:
    for method in ("kv-cache", "static-graph"):
        found = rows(smoke, method, "inverse_images_per_s")
        assert sorted(r["batch"] for r in found) == [4, 8]
        assert all(r["value"] > 0 for r in found)
    for r in rows(smoke, "static-graph", "inverse_images_per_s"):
        assert r["graph"] is False  # no CUDA graph on the CPU
    diffs = rows(smoke, "static-graph", "max_abs_diff_vs_kv_cache")
    assert len(diffs) == 2 and all(r["value"] < 1e-2 for r in diffs)


def test_smoke_sampling_rows(smoke: dict) -> None:
    for method in ("ntm-full", "ntm-fast"):
        (r,) = rows(smoke, method, "sample_images_per_s")
        assert r["value"] > 0 and r["steps"] == 4 and r["finite"]
    (speedup,) = rows(smoke, "ntm-fast", "speedup")
    assert speedup["baseline"] == "ntm-full" and speedup["target"] == 5.0


def test_smoke_stability_and_syncs(smoke: dict) -> None:
    (bad,) = rows(smoke, "ntm", "nonfinite_steps")
    (ips,) = rows(smoke, "ntm", "train_images_per_s", "t2i ")
    assert ips["value"] > 0
    assert bad["value"] == 0 and bad["train_steps"] == 20
    (mem,) = rows(smoke, "ntm", "peak_memory_gib")
    assert mem["value"] > 0
    (sync,) = rows(smoke, "ntm", "sync_free")
    assert sync["value"] is None and sync["skipped"] == "skipped-on-cpu"
