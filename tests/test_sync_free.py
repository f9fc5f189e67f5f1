"""With validation off, the training loss path reads no tensor value on the host (no GPU synchronisation).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` shows this (``benchmarks/gpu.py``, section e); on the
CPU these tests make every value-reading call raise inside the loss.
"""

import contextlib

import pytest
import torch

import trajflow
from trajflow.losses import TrajectoryNLL
from trajflow.predictors.transformer import TransformerPredictor, TransformerPredictorConfig
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

SHAPE = (1, 4, 4)
TEXT = 3


def _model(validate_args: bool, *, text: bool = True, conditional_transporter: bool = False) -> trajflow.NTM:
    torch.manual_seed(0)
    cond = {"text_features": TEXT} if text else {"num_classes": 3}
    t_cond = cond if conditional_transporter else {}
    transporter = TransformerTransporter(
        TransformerTransporterConfig(
            SHAPE,
            2,
            width=16,
            heads=2,
            layers_per_block=1,
            blocks=1,
            time_features=8,
            validate_args=validate_args,
            **t_cond,
        )
    )
    predictor = TransformerPredictor(
        TransformerPredictorConfig(
            SHAPE, 2, width=16, depth=1, heads=2, time_features=8, validate_args=validate_args, **cond
        )
    )
    return trajflow.NTM(transporter, predictor)


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Every call that copies a tensor's values to the host (a GPU sync) raises inside the block."""

    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"torch.Tensor.{name} called: a host-device synchronisation on a GPU")

        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "nonzero", "tolist", "__int__", "__float__", "numpy", "__index__"):
            m.setattr(torch.Tensor, name, forbid(name))
        m.setattr(torch, "nonzero", forbid("nonzero"))
        m.setattr(torch, "is_nonzero", forbid("is_nonzero"))
        yield


def _cond(n: int, text: bool):
    if text:
        return torch.randn(n, 5, TEXT), torch.ones(n, 5, dtype=torch.bool)
    return torch.randint(0, 3, (n,))


@pytest.mark.parametrize(
    "steps, mode, text, conditional_transporter, weights",
    [
        (4, "trajectory", True, False, None),
        (3, "pair", False, False, "velocity"),
        ((2, 3), "trajectory", True, True, None),
        ((2, 3), "pair", False, True, None),
    ],
)
def test_the_loss_path_reads_no_values_with_validation_off(
    monkeypatch, steps, mode, text, conditional_transporter, weights
):
    model = _model(False, text=text, conditional_transporter=conditional_transporter)
    loss = TrajectoryNLL(steps=steps, mode=mode, factor_weights=weights, t_min=(0.0, 0.05), validate_args=False)
    x0, cond = torch.randn(6, *SHAPE), _cond(6, text)
    g = torch.Generator().manual_seed(0)
    with _no_host_reads(monkeypatch):
        value = loss(model, x0, cond, generator=g)
        value.backward()
    assert torch.isfinite(value)
    # the same generator gives the same loss, bit for bit, with validation on: the flag changes the checks,
    # never the draws (a set of T included)
    checked = TrajectoryNLL(steps=steps, mode=mode, factor_weights=weights, t_min=(0.0, 0.05))
    same = checked(
        _model(True, text=text, conditional_transporter=conditional_transporter),
        x0,
        cond,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(value.detach(), same.detach())


def test_a_single_T_uses_every_example_without_grouping(monkeypatch):
    loss = TrajectoryNLL(steps=3, validate_args=False)
    groups = loss.draw(_model(False), torch.randn(4, *SHAPE), _cond(4, True), validate=False)
    assert len(groups) == 1 and torch.equal(groups[0].index, torch.arange(4))


def test_with_validation_on_nan_input_still_raises_clearly():
    model = _model(True)
    x0 = torch.randn(4, *SHAPE)
    x0[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="x0: expected finite values"):
        TrajectoryNLL(steps=3)(model, x0, _cond(4, True))
    # and the argument-level switch overrides the field either way
    with pytest.raises(ValueError, match="x0: expected finite values"):
        TrajectoryNLL(steps=3, validate_args=False).per_example(model, x0, _cond(4, True), validate=True)


def test_shape_checks_stay_on_without_validation():
    model = _model(False)
    with pytest.raises(ValueError, match="x0: expected shape"):
        TrajectoryNLL(steps=3, validate_args=False)(model, torch.randn(4, 1, 4, 5), _cond(4, True))
    with pytest.raises(ValueError, match="grid"):
        model.distribution(torch.tensor([[0.0, 0.5, 1.0]])[..., :1], validate_args=False)


def test_the_guard_catches_the_checks_of_a_validating_loss(monkeypatch):
    """The same call with validation on reads values: the guard above does see host reads."""
    model, x0, cond = _model(True), torch.randn(4, *SHAPE), _cond(4, True)
    with _no_host_reads(monkeypatch), pytest.raises(AssertionError, match="synchronisation"):
        TrajectoryNLL(steps=3)(model, x0, cond)


def test_multi_T_grouping_reads_no_values(monkeypatch):
    """A set of T is split over a random permutation, whatever the validation: nothing read on the host."""
    with _no_host_reads(monkeypatch):
        groups = TrajectoryNLL(steps=(2, 3))._groups(5, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert [T for T, _ in groups] == [2, 3] and [len(i) for _, i in groups] == [2, 3]
    assert torch.equal(torch.cat([i for _, i in groups]).sort().values, torch.arange(5))
