"""``benchmarks/bpd.py --smoke``: every method trains through ``trajflow.train.Trainer`` at equal time and
the results file has the rows, fields and mean rows of ``benchmarks/results/bpd.json``.

The smoke run's numbers mean nothing (2 NTM iterations); what is checked is the protocol and the format.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trajflow.baselines import pixel_categorical_bits_per_dim

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")  # the digits

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("ntm", "tarflow", "gaussian")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_bpd", ROOT / "benchmarks" / "bpd.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_bpd"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        tmp = tmp_path_factory.mktemp("bpd")
        module.main(["--smoke", "--out", str(tmp / "bpd.json"), "--samples-dir", str(tmp / "png"), "--work", str(tmp)])
        yield module, tmp, json.loads((tmp / "bpd.json").read_text())
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("bench_bpd", None)


def rows(payload: dict, method: str, seed: object) -> list[dict]:
    return [r for r in payload["rows"] if r["method"] == method and r["seed"] == seed]


@pytest.mark.slow
def test_smoke_rows_have_the_committed_results_fields(bench):
    _, _, payload = bench
    committed = json.loads((ROOT / "benchmarks" / "results" / "bpd.json").read_text())
    assert payload["benchmark"] == "bpd" and set(payload) == set(committed)
    for method in ("pixel-categorical", *TRAINED):
        for seed in (None, 0, "mean"):
            ours, theirs = rows(payload, method, seed), rows(committed, method, seed)
            assert len(ours) == len(theirs), (method, seed)
            if ours:
                assert list(ours[0]) == list(theirs[0]), (method, seed)  # the same keys, in the same order
    for r in payload["rows"]:
        assert r["task"] == "digits" and r["metric"] == "bits_per_dim"


@pytest.mark.slow
def test_smoke_trains_at_equal_time_through_the_trainer(bench):
    _, work, payload = bench
    for seed in (0, 1):
        ntm = rows(payload, "ntm", seed)[0]
        assert ntm["train_iters"] == 2 and ntm["time_ratio"] == 1.0  # the NTM's seconds are the budget
        for method in TRAINED:
            r = rows(payload, method, seed)[0]
            assert r["budget"] == "equal-time" and r["reference"] == "ntm"
            # a time-budgeted run stops at the first step past the budget: never short of it
            assert r["time_ratio"] >= 0.99 and r["train_iters"] >= 1
            run = work / "digits" / f"seed-{seed}" / method
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            assert log[-1]["step"] == r["train_iters"]  # the Trainer's own log of the same run
            assert (run / "checkpoints" / f"step-{r['train_iters']:07d}" / "model.safetensors").exists()
    flow, ntm = rows(payload, "tarflow", 0)[0], rows(payload, "ntm", 0)[0]
    assert abs(flow["params"] - ntm["params"]) / ntm["params"] <= 0.1  # the matched single flow


@pytest.mark.slow
def test_smoke_mean_rows_and_pixel_floor(bench):
    module, work, payload = bench
    for method in TRAINED:
        per_seed = [rows(payload, method, s)[0]["value"] for s in (0, 1)]
        mean = rows(payload, method, "mean")[0]
        assert mean["seeds"] == [0, 1] and mean["n_seeds"] == 2
        assert mean["value"] == pytest.approx(sum(per_seed) / 2, abs=1e-5)
        assert mean["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5, abs=1e-5)
        assert torch.isfinite(torch.tensor(per_seed)).all()
    cfg = module.CONFIGS["cpu"]
    train_set, eval_set = module.split_data("digits", "test", cfg, 16)
    expected = float(pixel_categorical_bits_per_dim(train_set.images, eval_set.images, 17).mean())
    assert rows(payload, "pixel-categorical", None)[0]["value"] == pytest.approx(expected, abs=1e-5)
    for name in ("ntm", "gaussian", "fm"):
        assert (work / "png" / f"digits_{name}_4step.png").exists()
    table = module.markdown_table(work / "bpd.json")
    assert "| digits | tarflow |" in table and "± " in table
