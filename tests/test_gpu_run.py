"""``benchmarks/gpu_run.sh``: the prepared GPU run, rehearsed on the CPU (issue 18).

The whole ``--smoke`` rehearsal takes a minute or more (``benchmarks/fewstep.py --smoke`` trains a reader, a
teacher and five rows), so the test runs it restricted by ``GPU_RUN_PARTS`` and makes two parts fail through
tiny ``GPU_RUN_TIMEOUT_<PART>`` overrides: the log, the per-part status lines and the results of the part in
between show that a failing part does not stop the others. The GPU plan itself is checked with
``--dry-run``; ``gpu.py``'s ``--time-budget`` (what keeps the speed part inside its timeout) directly.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def run_script(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def status_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "status.tsv", newline="") as fh:
        return {row["part"]: row for row in csv.DictReader(fh, delimiter="\t")}


def test_smoke_rehearsal_continues_after_failed_parts(tmp_path: Path) -> None:
    """static (timeout 1 s) fails, speed runs and writes speed.json, fewstep (timeout 1 s) fails and its
    work folder (seeded from a fake cache) is packed; the run ends with the listing and the summary."""
    cache = tmp_path / "cache"
    (cache / "teacher" / "final").mkdir(parents=True)
    (cache / "teacher" / "final" / "config.json").write_text("{}")
    (cache / "teacher" / "train").mkdir()
    (cache / "teacher" / "train" / "big.pt").write_text("not carried")
    (cache / "reader-abc").mkdir()
    (cache / "reader-abc" / "reader.safetensors").write_text("weights")
    out = tmp_path / "out"
    proc = run_script(
        "--smoke",
        str(out),
        GPU_RUN_PARTS="static,speed,fewstep",
        GPU_RUN_TIMEOUT_STATIC="1",
        GPU_RUN_TIMEOUT_FEWSTEP="1",
        GPU_RUN_KILL_AFTER="2",
        FEWSTEP_CACHE=str(cache),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # some part failed

    log = (out / "gpu_run.log").read_text()
    assert log == proc.stdout  # the log holds the whole output, down to the summary
    for part in ("static", "speed", "fewstep"):
        assert f"== {part}: start" in log and f"== {part}: end" in log
    assert "status static: timeout (rc 124" in log
    assert "status speed: ok (rc 0" in log
    assert "status fewstep: timeout (rc 124" in log
    assert log.index("status static") < log.index("== speed: start") < log.index("status fewstep")
    summary = log[log.index("== summary") :].splitlines()[1:]
    assert [line.split()[:2] for line in summary] == [
        ["install", "skipped"],  # the packages import already here
        ["static", "timeout"],
        ["speed", "ok"],
        ["fewstep", "timeout"],
    ]

    status = status_rows(out)
    assert list(status) == ["install", "static", "speed", "fewstep"]
    assert (status["static"]["verdict"], status["static"]["rc"], status["static"]["timeout_s"]) == (
        "timeout",
        "124",
        "1",
    )
    assert (status["speed"]["verdict"], status["speed"]["rc"]) == ("ok", "0")
    assert "nonfinite 0" in status["speed"]["detail"]

    speed = json.loads((out / "speed.json").read_text())
    assert speed["smoke"] and speed["complete"] and speed["time_budget_seconds"] == 150
    assert speed["sizes"]["train_steps"] == speed["sizes"]["sample_repeats"] == 2  # --repeats 2
    assert {"nonfinite_steps", "sync_free", "inverse_images_per_s", "mfu"} <= {r["metric"] for r in speed["rows"]}
    assert all("device" in r and "torch" in r for r in speed["rows"])
    if importlib.util.find_spec("diffusers") is not None:  # section (f), issue 17's SD3 fine-tuning throughput
        assert {"ntm-fm", "fm"} <= {r["method"] for r in speed["rows"] if r["task"].startswith("sd3-")}
        assert "sd3 ntm-fm" in status["speed"]["detail"]

    # fewstep's work folder: seeded from the cache (teacher/final and the reader's weights only), then packed
    assert "seeded" in log and not (out / "fewstep").exists()
    with tarfile.open(out / "fewstep-work.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"fewstep/teacher/final/config.json", "fewstep/reader-abc/reader.safetensors"} <= names
    assert not any("train" in n for n in names)
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # the device tool returns at most 8 files


def test_gpu_plan_fits_eleven_minutes(tmp_path: Path) -> None:
    proc = run_script("--dry-run", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    limits = dict(re.findall(r"(\w+) (\d+)", re.search(r"timeouts \(s\): (.*)", log).group(1)))
    kill_after = int(limits.pop("after"))
    budget = int(limits.pop("budget"))
    assert budget <= 600 - 15  # the device tool runs one command for at most 600 s
    assert set(limits) == {"install", "static", "speed", "fewstep"}
    assert sum(map(int, limits.values())) + kill_after * len(limits) <= 11 * 60
    assert int(limits["static"]) == 60 and int(limits["speed"]) == 240 and int(limits["fewstep"]) == 300
    out = tmp_path / "out"
    static = re.search(r"  static: (.*)", log).group(1)
    assert "tests/test_static_cache.py" in static and "on_cuda" not in static  # the CUDA-graph tests included
    speed = re.search(r"  speed: (.*)", log).group(1)
    assert "benchmarks/gpu.py --repeats 3 --time-budget 210 --incremental" in speed
    assert "--sections" not in speed  # gpu.py's default: a-f, (f) the SD3 fine-tuning throughput
    assert f"--out {out}/speed.json" in speed and "--smoke" not in speed
    fewstep = re.search(r"  fewstep: (.*)", log).group(1)
    assert fewstep.endswith(f"benchmarks/fewstep.py --config gpu --work {out}/fewstep --out {out}/fewstep.json")
    assert "dry run: nothing run" in log


def test_parts_without_time_left_are_not_started(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script("--smoke", str(out), timeout=60, GPU_RUN_PARTS="static,speed", GPU_RUN_BUDGET="15")
    assert proc.returncode == 1
    status = status_rows(out)
    assert status["static"]["verdict"] == status["speed"]["verdict"] == "no-time"
    assert "GPU_RUN_BUDGET=15" in status["speed"]["detail"]
    assert "== static: start" not in proc.stdout and not (out / "speed.json").exists()


@pytest.mark.parametrize(
    "args, env",
    [((), {}), (("--bogus", "x"), {}), (("a", "b"), {}), (("--smoke", "x"), {"GPU_RUN_PARTS": "static,nope"})],
)
def test_usage_errors(tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    args = tuple(str(tmp_path / a) if a in ("x", "a", "b") else a for a in args)
    assert run_script(*args, timeout=60, **env).returncode == 2


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_gpu_run", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu_run"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("bench_gpu_run", None)


def test_time_budget_stops_long_run_early(gpu_bench, tmp_path: Path) -> None:
    """(d) stops once the budget less (e)'s 20 s reserve is spent, and says so; (e) still runs."""
    out = tmp_path / "speed.json"
    gpu_bench.main(["--smoke", "--sections", "d,e", "--long-steps", "100000", "--time-budget", "21",
                    "--incremental", "--out", str(out)])  # fmt: skip
    payload = json.loads(out.read_text())
    (nonfinite,) = [r for r in payload["rows"] if r["metric"] == "nonfinite_steps"]
    assert 1 <= nonfinite["train_steps"] < 100000 and nonfinite["planned_steps"] == 100000
    assert nonfinite["stopped_early"] and nonfinite["value"] == 0
    assert [r["metric"] for r in payload["rows"]][-1] == "sync_free"
    assert payload["complete"] is True


def test_spent_budget_skips_sections(gpu_bench, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    gpu_bench.main(["--smoke", "--sections", "b,c", "--time-budget", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["metric"], r["task"][:11]) for r in rows] == [
        ("section_skipped", "section (b)"),
        ("section_skipped", "section (c)"),
    ]
    with pytest.raises(SystemExit):
        gpu_bench.main(["--smoke", "--repeats", "0", "--out", str(out)])
