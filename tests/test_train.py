"""The generic training loop: exact resumption, atomic checkpoints, config checks, EMA, schedule, sampler."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import trajflow.train.trainer as train_module
from trajflow.checkpoint import (
    CheckpointDir,
    atomic_write,
    check_config,
    config_differences,
    dataclass_from_dict,
    load_model_weights,
    load_safetensors,
    load_state,
    save_model,
    write_manifest,
)
from trajflow.ema import EMA
from trajflow.schedules import CosineWarmup, cosine_with_warmup
from trajflow.train import (
    ResumableSampler,
    Trainer,
    TrainerConfig,
    capture_rng_state,
    restore_rng_state,
)

pytest.importorskip("accelerate")  # the Trainer (one process or many) and its safetensors checkpoints
pytest.importorskip("safetensors")


class Tiny(nn.Module):
    """A small MLP with dropout, so that the global torch RNG matters too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def noisy_objective(model, batch, generator, step):
    """Denoising regression: uses the trainer's generator, numpy's and python's global RNGs."""
    (x,) = batch
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    scale = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    loss = (model(x + scale * noise) - x).square().mean()
    return loss, {"noise_scale": torch.tensor(scale)}


def _data(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)))


def _config(**kw) -> TrainerConfig:
    base = dict(
        max_steps=7,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=100,
        ema_decay=0.9,
        progress=False,
    )
    return TrainerConfig(**{**base, **kw})


def _fit(out, cfg, **kw):
    trainer = Trainer(cfg, out)
    return trainer.fit(Tiny(), noisy_objective, _data(), run_config={"model": {"width": 16}}, **kw)


def _state(ckpt):
    model, _ = load_safetensors(ckpt / "model.safetensors")
    ema, meta = load_safetensors(ckpt / "ema.safetensors")
    return model, ema, meta, load_state(ckpt / "optimizer.safetensors"), load_state(ckpt / "scheduler.safetensors")


def _assert_same(a, b):
    (ma, ea, meta_a, oa, sa), (mb, eb, meta_b, ob, sb) = _state(a), _state(b)
    for x, y in ((ma, mb), (ea, eb)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k  # bitwise
    assert meta_a == meta_b
    for k, st in oa["state"].items():
        for name, v in st.items():
            assert torch.equal(v, ob["state"][k][name]), (k, name)
    assert sa == sb


def test_resume_continues_exactly(tmp_path):
    """Seven steps in one go == three steps, a fresh process-like restart, four more (across an epoch end)."""
    whole = _fit(tmp_path / "a", _config())
    part = _fit(tmp_path / "b", _config(), stop_at=3)
    assert part.step == 3 and part.checkpoint.name == "step-0000003"
    # Consume random numbers between the runs: a resumed run must not depend on the state it starts in.
    torch.rand(5), np.random.rand(3), random.random()
    resumed = _fit(tmp_path / "b", _config(), resume=True)
    assert whole.step == resumed.step == 7
    assert whole.epoch == resumed.epoch == 1  # 20 examples / batch 4 = 5 batches per epoch
    _assert_same(whole.checkpoint, resumed.checkpoint)
    assert whole.loss == resumed.loss


def test_resume_with_grad_accum(tmp_path):
    whole = _fit(tmp_path / "a", _config(max_steps=4, grad_accum=2))
    _fit(tmp_path / "b", _config(max_steps=4, grad_accum=2), stop_at=1)
    resumed = _fit(tmp_path / "b", _config(max_steps=4, grad_accum=2), resume=True)
    _assert_same(whole.checkpoint, resumed.checkpoint)


def test_resume_from_other_config_names_fields(tmp_path):
    _fit(tmp_path, _config(), stop_at=2)
    with pytest.raises(ValueError, match=r"train\.lr .*checkpoint: 0\.01.*now: 0\.02"):
        _fit(tmp_path, _config(lr=2e-2), resume=True)
    trainer = Trainer(_config(), tmp_path)
    with pytest.raises(ValueError, match=r"model\.width"):
        trainer.fit(Tiny(), noisy_objective, _data(), run_config={"model": {"width": 32}}, resume=True)
    # Log and checkpoint cadence may change.
    r = _fit(tmp_path, _config(log_every=1, checkpoint_every=3), resume=True)
    assert r.step == 7


def test_keys_renamed_in_0_3_0_are_refused_with_their_new_names(tmp_path):
    """``train.steps`` (optimizer steps before 0.3.0) is ``train.max_steps``: a config or a checkpoint that still
    says ``steps`` is refused with both names, not ignored."""
    with pytest.raises(ValueError, match=r"config\.train\.steps: renamed config\.train\.max_steps in trajflow 0\.3\.0"):
        dataclass_from_dict(TrainerConfig, {"steps": 10}, "config.train")
    _fit(tmp_path, _config(), stop_at=2)
    ckpt = CheckpointDir(tmp_path / "checkpoints").latest()
    saved = json.loads((ckpt / "config.json").read_text())
    saved["train"]["steps"] = saved["train"].pop("max_steps")
    (ckpt / "config.json").write_text(json.dumps(saved))
    write_manifest(ckpt, 2)  # as a checkpoint written so would record it
    with pytest.raises(
        ValueError, match=r"train\.steps: renamed train\.max_steps in trajflow 0\.3\.0 \(in the checkpoint"
    ):
        _fit(tmp_path, _config(), resume=True)


def test_the_caller_names_its_own_fields_that_may_change_on_resume(tmp_path):
    """The trainer ignores only its own cadence fields; a caller's run_config fields need resume_ignore."""

    def fit(sample, **kw):
        run_config = {"model": {"width": 16}, "sample": {"guidance": sample}}
        return Trainer(_config(), tmp_path).fit(Tiny(), noisy_objective, _data(), run_config=run_config, **kw)

    fit(1.0, stop_at=2)
    with pytest.raises(ValueError, match=r"sample\.guidance"):
        fit(2.0, resume=True)
    assert fit(2.0, resume=True, resume_ignore=("sample.",)).step == 7


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    assert _fit(tmp_path, _config(max_steps=2), resume=True).step == 2


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A writer that dies mid-file leaves the previous checkpoint complete, loadable and resumable."""
    _fit(tmp_path, _config(checkpoint_every=2), stop_at=2)
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    assert ckpts.latest().name == "step-0000002"
    real_save = train_module.save_safetensors

    def dying_save(path, tensors, metadata=None):
        def half(fh):
            fh.write(b"\x00" * 64)  # some bytes reach the temporary file ...
            raise OSError("disk full")  # ... then the writer crashes

        atomic_write(path, half)

    monkeypatch.setattr(train_module, "save_safetensors", dying_save)
    with pytest.raises(OSError, match="disk full"):
        _fit(tmp_path, _config(checkpoint_every=2), resume=True, stop_at=4)
    assert [s for s, _ in ckpts.steps()] == [2]
    assert ckpts.latest().name == "step-0000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [".step-0000004.tmp"]  # the half-built folder, never renamed
    assert not (tmp_path / "checkpoints" / ".step-0000004.tmp" / "model.safetensors").exists()  # no half file
    model, _ = load_safetensors(ckpts.latest() / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
    # The next run resumes from step 2, clears the staging folder and finishes like an uninterrupted run.
    monkeypatch.setattr(train_module, "save_safetensors", real_save)
    resumed = _fit(tmp_path, _config(checkpoint_every=2), resume=True)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step")]
    whole = _fit(tmp_path / "ref", _config(checkpoint_every=2))
    _assert_same(whole.checkpoint, resumed.checkpoint)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, lambda fh: fh.write(b"old"))

    def broken(fh):
        fh.write(b"new but incomple")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_keep_last_k(tmp_path):
    r = _fit(tmp_path, _config(max_steps=6, checkpoint_every=1, keep_checkpoints=2))
    assert [s for s, _ in CheckpointDir(tmp_path / "checkpoints").steps()] == [5, 6]
    assert r.checkpoint.name == "step-0000006"
    files = sorted(p.name for p in r.checkpoint.iterdir())
    assert files == [
        "config.json",
        "ema.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng-rank0.safetensors",
        "scheduler.safetensors",
        "trainer.json",
    ]
    cfg = json.loads((r.checkpoint / "config.json").read_text())
    assert cfg["train"]["betas"] == [0.9, 0.95] and cfg["model"] == {"width": 16}


def test_log_records_loss_and_extras(tmp_path):
    r = _fit(tmp_path, _config(max_steps=4))
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s", "noise_scale"} <= set(lines[0])
    assert r.images_per_s > 0 and math.isfinite(r.loss)


def test_nan_loss_is_reported(tmp_path):
    def bad(model, batch, generator, step):
        return model(batch[0]).sum() * float("nan")

    trainer = Trainer(_config(max_steps=2, log_every=1), tmp_path)
    with pytest.raises(FloatingPointError, match="loss: became nan by step 1"):
        trainer.fit(Tiny(), bad, _data())


def test_model_weights_and_config_check(tmp_path):
    model = Tiny()
    save_model(tmp_path, model, {"model": {"width": 16, "depth": 1}})
    other = Tiny()
    load_model_weights(tmp_path, other, expected_config={"model": {"width": 16, "depth": 1}})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(ValueError, match=r"model\.depth \(checkpoint: 1, now: 2\)"):
        load_model_weights(tmp_path, other, expected_config={"model": {"width": 16, "depth": 2}})
    with pytest.raises(ValueError, match="do not fit the model"):
        load_model_weights(tmp_path, nn.Linear(3, 3))


def test_config_differences_ignore_and_missing():
    a = {"train": {"lr": 1, "log_every": 5}, "sample": {"steps": 4}, "x": 1}
    b = {"train": {"lr": 1, "log_every": 9}, "sample": {"steps": 8}}
    assert config_differences(a, b, ignore=("train.log_every", "sample.")) == [("x", "<missing>", 1)]
    check_config({"t": (1, 2)}, {"t": [1, 2]})  # tuples and JSON lists compare equal


def test_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    expected = {k: v.detach().clone() for k, v in net.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        for k, p in net.named_parameters():
            expected[k] = 0.9 * expected[k] + 0.1 * p.detach()
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=0, atol=1e-6)
    assert ema.num_updates == 3
    # Warmup: min(decay, (1 + n) / (10 + n)).
    w = EMA(net, decay=0.999)
    assert w.current_decay() == pytest.approx(0.1)
    w.num_updates = 90
    assert w.current_decay() == pytest.approx(91 / 100)
    # Swapping the averages in and out restores the live weights exactly.
    live = [p.detach().clone() for p in net.parameters()]
    with ema.average_parameters(net):
        assert torch.equal(net.weight, ema.shadow["weight"])
    assert all(torch.equal(a, b) for a, b in zip(live, net.parameters()))
    # state_dict / metadata round trip.
    other = EMA(nn.Linear(4, 2), decay=0.9, warmup=False)
    other.load_state_dict(ema.state_dict(), ema.metadata())
    assert other.num_updates == 3 and torch.equal(other.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({})


def test_ema_keeps_float32_for_bf16_params():
    net = nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(net, decay=0.999, warmup=False)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    # A step of 0.001 would round away in bf16 (spacing ~0.0078 near 1), not in float32.
    assert not torch.equal(before, ema.shadow["weight"])


def test_cosine_with_warmup():
    f = CosineWarmup(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_with_warmup(opt, 4, 14, 0.1)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineWarmup(20, 10)


def test_resumable_sampler_shards_and_skips():
    parts = []
    for rank in range(3):
        s = ResumableSampler(11, seed=5, rank=rank, world_size=3)
        s.set_position(epoch=2, start=0)
        parts.append(list(s))
    assert all(len(p) == 3 for p in parts)  # 11 // 3, the tail is dropped so ranks step together
    flat = sum(parts, [])
    assert len(set(flat)) == 9
    s = ResumableSampler(11, seed=5, rank=1, world_size=3)
    s.set_position(epoch=2, start=2)
    assert list(s) == parts[1][2:]
    s.set_position(epoch=3, start=0)
    assert list(s) != parts[1]  # a new order each epoch


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = capture_rng_state(g)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    restore_rng_state(state, g)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"mixed_precision": "fp16"}, "train.mixed_precision"),
        ({"max_steps": 0}, "train.max_steps"),
        ({"warmup_steps": 50, "max_steps": 10}, "train.warmup_steps"),
        ({"ema_decay": 1.0}, "train.ema_decay"),
        ({"betas": (0.9,)}, "train.betas"),
        ({"grad_clip": -1.0}, "train.grad_clip: expected a non-negative number, got -1.0"),
    ],
)
def test_trainer_config_errors(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TrainerConfig(**kw)


def test_trainer_and_fit_name_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config: expected a trajflow.train.TrainerConfig, got dict"):
        Trainer({"max_steps": 4}, tmp_path)
    trainer = Trainer(_config(), tmp_path)
    with pytest.raises(TypeError, match="model, objective: expected an nn.Module .*, got function and Tiny"):
        trainer.fit(noisy_objective, Tiny(), _data())
    with pytest.raises(ValueError, match=r"stop_at: expected an integer >= 1, got 0 \(int\)"):
        trainer.fit(Tiny(), noisy_objective, _data(), stop_at=0)


def test_dataset_smaller_than_a_batch(tmp_path):
    trainer = Trainer(_config(batch_size=32), tmp_path)
    with pytest.raises(ValueError, match="batch_size=32"):
        trainer.fit(Tiny(), noisy_objective, _data(8))


_DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import Tiny, noisy_objective, _data, _config
from trajflow.train import Trainer
from trajflow.checkpoint import load_safetensors
torch.set_num_threads(1)
out = {out!r}
def fit(path, **kw):
    return Trainer(_config(), path).fit(Tiny(), noisy_objective, _data(), run_config={{"model": {{"width": 16}}}}, **kw)
a = fit(out + "/a")
fit(out + "/b", stop_at=3)
b = fit(out + "/b", resume=True)
if Trainer(_config(), out + "/c").is_main:
    for f in ("model.safetensors", "ema.safetensors"):
        x, _ = load_safetensors(a.checkpoint / f)
        y, _ = load_safetensors(b.checkpoint / f)
        assert all(torch.equal(x[k], y[k]) for k in x), f
    assert sorted(p.name for p in a.checkpoint.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    print("DDP-OK", a.loss)
"""


@pytest.mark.slow
def test_two_process_ddp_resumes_exactly(tmp_path):
    """Two CPU processes (gloo DDP through accelerate): sharded data, per-rank RNG files, exact resumption."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    done = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DDP-OK" in done.stdout


def test_time_budget_stops_on_time_with_the_schedule_over_the_budget(tmp_path):
    import time as _time

    def slow_objective(model, batch, generator, step):
        _time.sleep(0.01)  # a step costs at least 10 ms
        (x,) = batch
        return (model(x) - 1.0).square().mean()

    cfg = TrainerConfig(
        max_steps=10_000, batch_size=4, warmup_steps=500, lr=1e-2, min_lr_ratio=0.1, log_every=1,
        checkpoint_every=10_000, progress=False, time_budget=0.3, ema_decay=0.0,
    )  # fmt: skip
    data = TensorDataset(torch.randn(64, 2))
    result = Trainer(cfg, tmp_path).fit(torch.nn.Linear(2, 1), slow_objective, data)
    assert 5 <= result.step < 100  # stopped by the budget, far before `max_steps`
    assert 0.3 <= result.train_seconds < 0.3 + 0.2
    assert result.checkpoint is not None and result.checkpoint.name == f"step-{result.step:07d}"
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] < 1e-2 and max(lrs) == pytest.approx(1e-2, rel=0.05)  # warmup over 5% of the budget
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-6)  # the floor at the end of the budget
    # A resumed run continues from the recorded seconds: nothing is left to do.
    again = Trainer(cfg, tmp_path).fit(torch.nn.Linear(2, 1), slow_objective, data, resume=True)
    assert again.step <= result.step + 1


def test_time_budget_must_be_positive():
    for bad in (0.0, -5.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="train.time_budget: expected a positive number of seconds"):
            TrainerConfig(time_budget=bad)


def test_objective_receives_the_optimizer_step_across_micro_batches_and_resumption(tmp_path):
    seen: list[int] = []

    def objective(model, batch, generator, step):
        seen.append(step)
        return noisy_objective(model, batch, generator, step)

    cfg = _config(max_steps=5, grad_accum=2, checkpoint_every=1)
    Trainer(cfg, tmp_path).fit(Tiny(), objective, _data(), stop_at=3)
    assert seen == [0, 0, 1, 1, 2, 2]  # one value per optimizer step, the same for each of its micro-batches
    seen.clear()
    Trainer(cfg, tmp_path).fit(Tiny(), objective, _data(), resume=True)
    assert seen == [3, 3, 4, 4]  # a resumed run continues the count from its checkpoint


def test_a_resumed_run_carries_its_seconds_and_loss(tmp_path):
    cfg = _config(max_steps=4, checkpoint_every=2, log_every=2)
    part = _fit(tmp_path, cfg, stop_at=2)
    whole = _fit(tmp_path, cfg, resume=True)
    assert whole.train_seconds > part.train_seconds > 0  # the seconds of both sessions, not the last one's
    again = _fit(tmp_path, cfg, resume=True)  # already finished: no step is taken
    assert again.step == 4 and again.loss == whole.loss and again.train_seconds == whole.train_seconds


def test_evaluate_gives_a_learning_curve_with_the_ema_weights_outside_training_time(tmp_path):
    cfg = TrainerConfig(max_steps=20, batch_size=4, warmup_steps=0, ema_decay=0.9, checkpoint_every=100, progress=False)
    model = Tiny()
    seen = []

    def evaluate(m, point):
        assert not m.training
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"weight_sum": float(sum(p.detach().sum() for p in m.parameters()))}

    result = Trainer(cfg, tmp_path / "run").fit(model, noisy_objective, _data(), evaluate=evaluate, evaluate_points=4)
    points = result.evaluations
    assert [p["step"] for p in points] == [0, 5, 10, 15, 20]
    assert [p["progress"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all("weight_sum" in p and "train_seconds" in p for p in points)
    assert model.training  # back in training mode, with its raw weights restored
    raw = {k: v for k, v in model.state_dict().items()}
    assert any(not torch.equal(seen[-1][k], raw[k]) for k in raw)  # the evaluation saw the EMA weights
    with pytest.raises(ValueError, match="evaluate_points"):
        Trainer(cfg, tmp_path / "bad").fit(model, noisy_objective, _data(), evaluate=evaluate, evaluate_points=0)


def test_run_progress_is_the_larger_share_of_steps_and_budget():
    assert TrainerConfig(max_steps=100, warmup_steps=0).run_progress(25, 1e9) == 0.25  # no budget: steps only
    timed = TrainerConfig(max_steps=1_000_000, warmup_steps=0, time_budget=60.0)
    assert timed.run_progress(10, 15.0) == 0.25 and timed.run_progress(10, 120.0) == 1.0
    assert TrainerConfig(max_steps=10, warmup_steps=0, time_budget=1e6).run_progress(5, 1.0) == 0.5  # the cap binds


def test_objective_receives_the_progress_of_a_time_budget_across_resumption(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(train_module, "_clock", lambda: now[0])  # a clock the objective moves: 1 s per step
    seen: list[tuple[int, float]] = []

    def objective(model, batch, generator, step, *, progress):
        now[0] += 0.5  # each of the two micro-batches of a step takes half a second
        seen.append((step, progress))
        return noisy_objective(model, batch, generator, step)

    cfg = _config(max_steps=1_000_000, warmup_steps=0, grad_accum=2, checkpoint_every=2, time_budget=5.0)
    Trainer(cfg, tmp_path).fit(Tiny(), objective, _data(), stop_at=3)
    result = Trainer(cfg, tmp_path).fit(Tiny(), objective, _data(), resume=True)
    assert result.step == 5 and result.train_seconds == 5.0  # the budget, not the step cap, ended the run
    shares = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8]  # the same for both micro-batches of a step
    assert seen == [(k // 2, p) for k, p in zip(range(10), shares)]  # resumed at step 3 with 3 s done: 0.6
    # An objective without a progress parameter is called as before.
    Trainer(_config(max_steps=2), tmp_path / "plain").fit(Tiny(), noisy_objective, _data())


def test_fit_leaves_the_raw_weights_and_returns_the_ema_one_call_away(tmp_path):
    model = Tiny()
    result = Trainer(_config(max_steps=6, checkpoint_every=6), tmp_path).fit(model, noisy_objective, _data())
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt_ema, _ = load_safetensors(result.checkpoint / "ema.safetensors")
    result.ema.copy_to(model)  # the one call
    averaged = model.state_dict()
    assert any(not torch.equal(averaged[k], raw[k]) for k in ckpt_ema)  # the model held the raw weights
    for k, v in ckpt_ema.items():
        assert torch.equal(averaged[k], v)  # now the checkpoint's EMA weights
    assert (
        Trainer(_config(max_steps=2, ema_decay=0.0), tmp_path / "no-ema").fit(Tiny(), noisy_objective, _data()).ema
        is None
    )


def test_lr_scales_give_parameter_groups_their_own_learning_rate(tmp_path):
    cfg = TrainerConfig(
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        warmup_steps=0,
        min_lr_ratio=1.0,
        ema_decay=0.0,
        checkpoint_every=100,
        progress=False,
        lr_scales={"net.3.": 10.0},
    )
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(cfg, tmp_path / "run").fit(model, noisy_objective, _data())
    moved = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()}
    assert moved["net.3.bias"] > 5 * moved["net.0.bias"]  # Adam steps are ~lr: the scaled layer moves ~10x more
    groups = train_module._param_groups(model, 0.1, 1e-3, {"net.": 2.0, "net.3.": 10.0})
    assert [g["lr"] for g in groups] == [2e-3, 2e-3, 1e-2, 1e-2]  # the longest prefix wins
    with pytest.raises(ValueError, match="lr_scales"):
        TrainerConfig(lr_scales={"transporter.": 0.0})


# ------------------------------------------------------------------------------------------------ issue 16
def test_a_fresh_run_never_overwrites_a_run_and_pruning_keeps_the_newest_save(tmp_path):
    _fit(tmp_path, _config(max_steps=3))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(
        FileExistsError, match=r"out_dir: .* already holds a run \(checkpoints up to step-0000003.*resume=True"
    ):
        _fit(tmp_path, _config(max_steps=2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # config and log untouched
    # Step folders of a higher step (another history) never push out the checkpoint just written.
    ckpts = CheckpointDir(tmp_path / "other", keep=2)
    for step in (400, 600, 300):
        ckpts.commit(ckpts.staging(step), step)
    assert [s for s, _ in ckpts.steps()] == [300, 600] and ckpts.pointed().name == "step-0000300"


def test_a_damaged_checkpoint_is_named_and_skipped_for_the_newest_intact_one(tmp_path):
    from trajflow.checkpoint import DamagedCheckpointError, verify_checkpoint

    whole = _fit(tmp_path / "ref", _config(max_steps=4))
    _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), stop_at=3)
    newest = tmp_path / "checkpoints" / "step-0000003"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=r"step-0000003.* is damaged: model\.safetensors has \d+ bytes"):
        resumed = _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), resume=True)
    assert resumed.resumed_from.name == "step-0000002" and resumed.step == 4
    _assert_same(whole.checkpoint, resumed.checkpoint)  # continued exactly from the intact one
    # A step folder asked for by name is not replaced by another; with none intact, resuming is refused.
    (newest / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with pytest.raises(DamagedCheckpointError, match=r"model\.safetensors does not match its sha256"):
        _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), resume=newest)
    for path in (tmp_path / "checkpoints").glob("step-*"):
        (path / "optimizer.safetensors").write_bytes(b"")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"resume: no intact checkpoint in .*0 bytes"):
        _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), resume=True)
    with pytest.raises(DamagedCheckpointError, match="optimizer.safetensors"):
        verify_checkpoint(tmp_path / "checkpoints" / "step-0000004")


def test_an_edited_step_in_trainer_json_is_not_obeyed(tmp_path):
    from trajflow.checkpoint import DamagedCheckpointError, verify_checkpoint, write_manifest

    _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), stop_at=3)
    newest = tmp_path / "checkpoints" / "step-0000003"
    info = json.loads((newest / "trainer.json").read_text())
    (newest / "trainer.json").write_text(json.dumps({**info, "step": 1}, indent=2, sort_keys=True) + "\n")  # same size
    with pytest.warns(RuntimeWarning, match=r"trainer\.json does not match its sha256"):
        resumed = _fit(tmp_path, _config(max_steps=4, checkpoint_every=1), resume=True)
    assert resumed.resumed_from.name == "step-0000002"
    # Even with a manifest rewritten to match, the step must agree with the folder name and the weights.
    last = resumed.checkpoint
    (last / "trainer.json").write_text(json.dumps({**info, "step": 1}))
    write_manifest(last, 4)
    with pytest.raises(DamagedCheckpointError, match=r"step disagrees .*folder name: 4.*trainer\.json: 1"):
        verify_checkpoint(last)


def test_checkpoints_every_so_many_minutes(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(train_module, "_wall_clock", lambda: now[0])

    def objective(model, batch, generator, step):
        now[0] += 20.0  # a step takes 20 s of wall-clock time
        return noisy_objective(model, batch, generator, step)

    cfg = _config(max_steps=7, checkpoint_every=100, checkpoint_minutes=1.0, keep_checkpoints=10)
    Trainer(cfg, tmp_path).fit(Tiny(), objective, _data())
    assert [s for s, _ in CheckpointDir(tmp_path / "checkpoints").steps()] == [3, 6, 7]
    assert TrainerConfig().checkpoint_minutes == 10.0
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="train.checkpoint_minutes: expected a positive number of minutes"):
            TrainerConfig(checkpoint_minutes=bad)


def test_the_log_is_cut_back_to_the_step_resumed_from(tmp_path):
    class Killed(Exception):
        pass

    def dies_at_step_3(model, batch, generator, step):
        if step == 3:
            raise Killed
        return noisy_objective(model, batch, generator, step)

    cfg = _config(max_steps=5, log_every=1, checkpoint_every=2)
    with pytest.raises(Killed):
        Trainer(cfg, tmp_path).fit(Tiny(), dies_at_step_3, _data())  # logged steps 1-3, checkpointed step 2
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # a line cut short by the kill
    Trainer(cfg, tmp_path).fit(Tiny(), noisy_objective, _data(), resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_resume_with_another_thread_count_warns(tmp_path):
    threads = torch.get_num_threads()
    _fit(tmp_path, _config(max_steps=3), stop_at=1)
    assert json.loads((tmp_path / "checkpoints" / "step-0000001" / "trainer.json").read_text())["threads"] == threads
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(RuntimeWarning, match=rf"threads: .* {threads} torch threads and this run has {threads + 1}"):
            _fit(tmp_path, _config(max_steps=3), resume=True)
    finally:
        torch.set_num_threads(threads)


class _Evil:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_checkpoint_states_hold_no_pickle_and_pickled_states_are_not_read(tmp_path):
    from trajflow.checkpoint import MANIFEST_FILE, save_state

    _fit(tmp_path, _config(max_steps=4), stop_at=2)
    ckpt = tmp_path / "checkpoints" / "step-0000002"
    assert not list(ckpt.glob("*.pt"))
    # A checkpoint of the pickled format (before 0.3.0) is refused, naming the file: no pickle is ever loaded.
    sentinel = tmp_path / "pwned"
    torch.save({"state": _Evil(sentinel), "param_groups": []}, ckpt / "optimizer.pt")
    (ckpt / "optimizer.safetensors").unlink()
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match=r"optimizer\.safetensors' is missing \(a checkpoint written before"):
        _fit(tmp_path, _config(max_steps=4), resume=True)
    assert not sentinel.exists()
    with pytest.raises(TypeError, match=r"state: expected tensors, .* got function at state\.f"):
        save_state(tmp_path / "x.safetensors", {"f": lambda: 0})
