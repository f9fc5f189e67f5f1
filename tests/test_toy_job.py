"""The toy lab end to end: ``examples/toy/train.py`` writes its figure and metrics, resumes, and rejects bad input.

A method interrupted part-way and resumed through the Trainer ends with the same weights as an uninterrupted
one, and its checkpoints are the library's format (config.json + safetensors)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.toy.config import METHODS, ToyConfig
from examples.toy.evaluate import distances
from examples.toy.figure import _scores_text
from examples.toy.model import build_model
from examples.toy.train import main, run_toy, train_method, trainer_config
from trajflow.data.toy import toy_density

ROOT = Path(__file__).resolve().parents[1]


def _metrics_to_rows(metrics: dict) -> list[dict]:
    """``benchmarks/toy.py``'s flattening of a ``metrics.json`` into rows of the results format."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports its _common
    try:
        spec = importlib.util.spec_from_file_location("bench_toy", ROOT / "benchmarks" / "toy.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module.metrics_to_rows(metrics)


def tiny(max_steps: int = 3) -> list[str]:
    """A few optimizer steps and small evaluation sets: every run below takes seconds on one CPU core."""
    return ["--max-steps", str(max_steps), "--batch-size", "64", "--eval-samples", "300", "--threads", "1", "--quiet"]


TINY = tiny()
LABELS = {"ntm", "gaussian", "fm-euler-4", "fm-euler-100", "nsf"}


def _tiny_config(**kw) -> ToyConfig:
    base = dict(
        max_steps=6,
        batch_size=32,
        test_size=100,
        sample_size=100,
        elbo_samples=1,
        fm_steps_many=5,
        width=16,
        depth=1,
        transporter_hidden=8,
        threads=1,
        progress=False,
    )
    base.update(kw)
    return ToyConfig(**base)


def test_cli_writes_figure_and_metrics_for_every_method(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--density", "checkerboard", "--out", str(out), *TINY]) == 0
    png = out / "toy_checkerboard.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == LABELS
    for entry in metrics["methods"].values():
        for key in ("energy_distance", "sliced_wasserstein", "train_seconds", "train_iters", "params"):
            assert isinstance(entry[key], (int, float)), key
        assert entry["train_iters"] == 3
        # The fine-structure scores (issue 16, item 12): 3 training steps leave every model far from the
        # data, which a second data sample (the reference: the sampling floor) is not.
        assert metrics["reference"]["histogram_tv"] < entry["histogram_tv"] <= 1.0
        assert 0.0 <= entry["support_share"] < metrics["reference"]["support_share"] == 1.0
    assert {"histogram_tv", "support_share"} <= set(metrics["units"])
    for label in ("ntm", "gaussian"):
        assert {"elbo_nats_per_dim", "trajectory_nll_nats_per_dim"} <= set(metrics["methods"][label])
    assert "nll_nats_per_dim" in metrics["methods"]["nsf"]
    assert metrics["methods"]["fm-euler-100"]["steps"] == 100
    assert "energy_distance" in metrics["reference"]
    # Checkpoints: the Trainer's, one folder per method, plus the config that made them.
    for method in METHODS:
        [ckpt] = (out / method / "checkpoints").glob("step-*")
        assert ckpt.name == "step-0000003"
        assert {"config.json", "model.safetensors", "ema.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not list(out.rglob("*.pt.tmp")) and not list((out / "ntm" / "checkpoints").glob(".*"))
    assert json.loads((out / "config.json").read_text())["density"] == "checkerboard"
    # The rows of the benchmark format come out of the same metrics.
    rows = _metrics_to_rows(metrics)
    assert {(r["method"], r["steps"]) for r in rows} >= {("ntm", 4), ("fm-euler", 4), ("fm-euler", 100), ("nsf", None)}
    assert {(r["method"], r["metric"]) for r in rows} >= {("data", "histogram_tv"), ("ntm", "support_share")}


def test_the_script_runs_from_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = str(ROOT / "examples" / "toy" / "train.py")
    cmd = [sys.executable, script, "--density", "spirals", "--out", str(out), "--methods", "fm"]
    done = subprocess.run([*cmd, *TINY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "toy_spirals.png").is_file()
    assert set(json.loads((out / "metrics.json").read_text())["methods"]) == {"fm-euler-4", "fm-euler-100"}
    assert "energy dist" in done.stdout and "hist TV" in done.stdout  # the summary table


def test_resume_with_another_budget_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--out", str(out), "--methods", "nsf"]
    assert main([*args, *tiny(3)]) == 0
    capsys.readouterr()
    # The budget sets the learning-rate schedule, so a resumed run must keep it; the error names the field.
    assert main([*args, *tiny(5), "--resume"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_resuming_a_finished_run_reproduces_its_metrics(tmp_path: Path) -> None:
    cfg = _tiny_config(methods=("ntm", "fm"))
    first = run_toy(cfg, tmp_path).metrics["methods"]
    again = run_toy(cfg, tmp_path, resume=True).metrics["methods"]
    for label, entry in first.items():
        for key in ("energy_distance", "sliced_wasserstein", "train_iters", "train_loss", "train_seconds"):
            assert again[label][key] == entry[key], (label, key)
    assert again["ntm"]["elbo_nats_per_dim"] == first["ntm"]["elbo_nats_per_dim"]


def test_resume_refuses_a_different_training_config(tmp_path: Path) -> None:
    run_toy(_tiny_config(methods=("fm",)), tmp_path)
    with pytest.raises(ValueError, match="lr"):
        run_toy(_tiny_config(methods=("fm",), lr=1e-4), tmp_path, resume=True)
    # Without --resume an existing run is not overwritten.
    with pytest.raises(FileExistsError, match="--resume"):
        run_toy(_tiny_config(methods=("fm",)), tmp_path)


def test_existing_run_without_resume_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--out", str(tmp_path), "--methods", "fm", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--density", "not_a_density"], "invalid choice: 'not_a_density'"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["--steps", "-3"], "argument --steps: expected an integer >= 1"),
        (["--max-steps", "0"], "argument --max-steps: expected an integer >= 1"),
        (["--max-steps", "5", "--time-budget", "2"], "not allowed with argument"),
        (["--methods", "ntm,diffusion"], "argument --methods: expected a comma-separated subset"),
    ],
)
def test_bad_arguments_give_a_clear_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_missing_out_is_an_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": "nope"}, "unknown toy density 'nope'; valid names"),
        ({"steps": 0}, "steps: expected an integer >= 1"),
        ({"max_steps": None}, "exactly one training budget"),
        ({"max_steps": 5, "time_budget": 1.0}, "exactly one training budget"),
        ({"methods": ("ntm", "ddpm")}, "methods: expected a non-empty subset"),
        ({"t_min": 0.3}, "t_min"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToyConfig(**kwargs)


def test_from_dict_names_unknown_fields() -> None:
    assert ToyConfig.from_dict(ToyConfig().to_dict()) == ToyConfig()
    with pytest.raises(ValueError, match=r"config: ToyConfig has no field\(s\) \['densty'\]"):
        ToyConfig.from_dict({"densty": "moons"})


def test_keys_renamed_in_0_3_0_name_their_new_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = {k: v for k, v in ToyConfig().to_dict().items() if k not in ("max_steps", "time_budget")}
    with pytest.raises(ValueError, match=r"config\.iters: renamed config\.max_steps in trajflow 0\.3\.0"):
        ToyConfig.from_dict({**old, "iters": 1200, "seconds": None})
    # A run folder written before 0.3.0, resumed: its config.json's old keys are named with their new names.
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**old, "iters": 3, "seconds": None}))
    assert main(["--out", str(out), "--methods", "nsf", *tiny(3), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.iters: renamed config.max_steps" in err and "config.seconds: renamed config.time_budget" in err


def test_time_budget(tmp_path: Path) -> None:
    cfg = _tiny_config(max_steps=None, time_budget=0.5, methods=("fm",))
    result = run_toy(cfg, tmp_path)
    entry = result.metrics["methods"]["fm-euler-4"]
    assert entry["train_iters"] >= 1 and 0.5 <= entry["train_seconds"] < 5.0
    assert result.metrics["budget"] == {"time_budget": 0.5}


# -- interrupted and resumed methods ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ntm", "fm"])
def test_interrupted_and_resumed_equals_uninterrupted(method: str, tmp_path: Path) -> None:
    cfg = _tiny_config(checkpoint_every=2)
    reference, ref_record = train_method(method, cfg, tmp_path / "whole")
    # Killed after step 3: a step that is not a multiple of checkpoint_every, checkpointed as an interruption.
    _, first = train_method(method, cfg, tmp_path / "split", stop_at=3)
    assert first.step == 3
    resumed, record = train_method(method, cfg, tmp_path / "split", resume=True)
    assert record.resumed_from == 3 and record.step == 6 == ref_record.step
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # And training did move the weights (the comparison above is not between two untouched models).
    untrained = build_model(method, cfg).state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in resumed.state_dict().items())


def test_checkpoints_are_config_json_and_safetensors(tmp_path: Path) -> None:
    cfg = _tiny_config(checkpoint_every=2)
    model, record = train_method("ntm", cfg, tmp_path, stop_at=4)
    folder = tmp_path / "ntm" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000002", "step-0000004"]
    assert record.checkpoint == folder / "step-0000004"
    config = json.loads((record.checkpoint / "config.json").read_text())
    assert config["method"] == "ntm" and config["toy"]["density"] == "checkerboard"
    assert config["train"]["max_steps"] == 6 and config["train"]["batch_size"] == 32
    weights = load_file(record.checkpoint / "model.safetensors")
    assert set(weights) == set(build_model("ntm", cfg).state_dict())
    # The returned model holds the EMA weights of that checkpoint.
    ema = load_file(record.checkpoint / "ema.safetensors")
    params = dict(model.named_parameters())
    assert set(ema) == set(params)
    for name, value in ema.items():
        assert torch.equal(params[name].detach(), value), name
    # No pickles: the optimizer, scheduler and random states are safetensors + JSON too, with a manifest.
    assert not list(tmp_path.rglob("*.pt"))
    assert {"optimizer.safetensors", "rng-rank0.safetensors", "manifest.json"} <= {
        p.name for p in record.checkpoint.iterdir()
    }


def test_run_toy_resumes_an_interrupted_method(tmp_path: Path) -> None:
    cfg = _tiny_config(methods=("fm",), checkpoint_every=2)
    whole = run_toy(cfg, tmp_path / "whole").metrics["methods"]
    train_method("fm", cfg, tmp_path / "split", stop_at=2)  # as if the job was killed during fm's training
    resumed = run_toy(cfg, tmp_path / "split", resume=True).metrics["methods"]
    for label in ("fm-euler-4", "fm-euler-5"):
        for key in ("energy_distance", "sliced_wasserstein", "train_iters"):
            assert resumed[label][key] == whole[label][key], (label, key)


# -- issue 16: checkpoint intervals, the thread count -------------------------------------------------------
def test_cli_sets_the_checkpoint_interval_in_steps_and_minutes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--out", str(out), "--methods", "fm", *tiny(5), "--checkpoint-every", "2"]
    assert main([*args, "--checkpoint-minutes", "0.5"]) == 0
    # keep_checkpoints=2: the step-2 folder was written, then pruned after step 4.
    assert sorted(p.name for p in (out / "fm" / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000005"]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["checkpoint_every"], saved["checkpoint_minutes"]) == (2, 0.5)
    assert trainer_config(ToyConfig(checkpoint_minutes=0.5)).checkpoint_minutes == 0.5
    with pytest.raises(SystemExit):
        main([*args, "--checkpoint-minutes", "0"])
    assert "argument --checkpoint-minutes: expected a positive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="checkpoint_minutes: expected a positive number of minutes"):
        ToyConfig(checkpoint_minutes=-1.0)


def test_the_thread_count_is_fixed_recorded_and_a_resume_with_another_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load_average() -> tuple[float, float, float]:
        raise AssertionError("the default thread count must not depend on the machine's load")

    monkeypatch.setattr("os.getloadavg", no_load_average)
    assert ToyConfig().threads == 1
    cfg = _tiny_config(methods=("fm",), threads=ToyConfig().threads, checkpoint_every=2)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_method("fm", cfg, tmp_path, stop_at=2)  # as if killed, with 1 thread
        with pytest.warns(RuntimeWarning, match="written with 1 torch threads and this run has 2"):
            result = run_toy(_tiny_config(methods=("fm",), threads=2, checkpoint_every=2), tmp_path, resume=True)
    finally:
        torch.set_num_threads(previous)
    assert result.metrics["threads"] == 2 and result.metrics["config"]["threads"] == 2


def test_distances_see_fine_structure_and_the_support_only_where_there_is_one() -> None:
    """The toy job's distances add the histogram distance to the exact density on its fixed grid, and the
    share in the support only for a density with a bounded one."""
    g = torch.Generator().manual_seed(0)
    spirals, board = toy_density("spirals"), toy_density("checkerboard")
    x, test = spirals.sample(2000, generator=g), spirals.sample(2000, generator=g)
    clean = distances(x, test, "spirals")
    assert set(clean) == {"energy_distance", "sliced_wasserstein", "histogram_tv"}
    blurred = distances(x + 0.3 * torch.randn(2000, 2, generator=g), test, "spirals")
    assert blurred["histogram_tv"] > 2 * clean["histogram_tv"]
    b = board.sample(2000, generator=g)
    assert distances(b, b, "checkerboard")["support_share"] == 1.0
    assert distances(b + 0.75, b, "checkerboard")["support_share"] < 0.5


def test_figure_titles_show_the_fine_structure_scores() -> None:
    entry = {"energy_distance": 0.00012, "histogram_tv": 0.0734, "support_share": 0.9871}
    assert _scores_text(entry) == "ED 0.0001, TV 0.073\n98.7% in the support"
    assert _scores_text({"energy_distance": 0.5, "histogram_tv": 0.25}) == "ED 0.5000, TV 0.250"
