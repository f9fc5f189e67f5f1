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


HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def run_smoke(out: Path, *args: str) -> dict:
    """``benchmarks/gpu.py --smoke --out out *args``, loaded as a module; the payload it wrote."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        module.main(["--smoke", "--out", str(out), *args])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("bench_gpu", None)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_smoke(tmp_path_factory.mktemp("speed") / "speed.json")


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


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="section (f) needs diffusers (pip install diffusers)")
def test_smoke_sd3_finetune_rows(smoke: dict) -> None:
    """(f): NTM fine-tuning from a tiny random SD3Transformer2DModel against FM on it, same sizes and rows as
    on the GPU (images/s, peak memory, the ratio), run in the order a, b, c, f, d, e."""
    assert smoke["sections"] == ["a", "b", "c", "d", "e", "f"]
    tasks = [r["task"] for r in smoke["rows"]]
    first_sd3 = next(i for i, t in enumerate(tasks) if t.startswith("sd3-"))
    assert tasks[first_sd3 - 1].startswith("sample ") and tasks[first_sd3 + 5].startswith("t2i ")  # after (c)
    for method, steps in (("ntm-fm", 4), ("fm", None)):
        (ips,) = rows(smoke, method, "train_images_per_s", "sd3-tiny-finetune")
        (mem,) = rows(smoke, method, "peak_memory_gib", "sd3-tiny-finetune")
        for r in (ips, mem):
            assert r["value"] > 0 and math.isfinite(r["value"])
            assert r["steps"] == steps and r["batch"] == 4 and r["tokens"] == 16 and r["text_tokens"] == 8
            assert isinstance(r["params"], int) and r["params"] > 0  # the SD3 transformer's own parameters
            assert r["recipe"].endswith("sd3_medium_512.json")
        assert math.isfinite(ips["loss"]) and len(ips["all"]) == 2
        assert ips["sd3_config"]["in_channels"] == 16 and ips["sd3_config"]["sample_size"] == 8
    ntm, fm = (rows(smoke, m, "train_images_per_s", "sd3-")[0] for m in ("ntm-fm", "fm"))
    assert ntm["model_params"] > fm["model_params"] == fm["params"]  # + the transporter and the scale head
    (ratio,) = rows(smoke, "ntm-fm", "throughput_ratio_vs_fm", "sd3-")
    assert ratio["baseline"] == "fm" and ratio["value"] == pytest.approx(ntm["value"] / fm["value"])


def test_sd3_section_skipped_without_diffusers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    payload = run_smoke(tmp_path / "speed.json", "--sections", "f")
    (row,) = payload["rows"]
    assert row["metric"] == "section_skipped" and row["task"].startswith("section (f)")
    assert "diffusers" in row["reason"]
