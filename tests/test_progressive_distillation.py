"""Progressive distillation (trajflow.baselines.progressive_distillation): the target is two teacher Euler
steps, the student's grid nests in the teacher's, an exact student samples as the teacher does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from trajflow.baselines import ProgressiveDistillationLoss, distillation_rounds, euler_sample
from trajflow.predictors.transformer import TransformerPredictorConfig
from trajflow.process import time_grid
from trajflow.velocity import MLPVelocity, TransformerVelocity, VelocityModel


def teacher(kind: str = "mlp") -> VelocityModel:
    """A tiny class-conditional velocity model, its weights perturbed (the transformer's head starts at 0)."""
    if kind == "mlp":
        model = MLPVelocity(2, num_classes=3, width=16, depth=1, time_features=8)
    else:
        config = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2, num_classes=3)
        model = TransformerVelocity(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


class ExactStudent(VelocityModel):
    """Returns the loss's target at the student's grid times: the student the loss is minimised by."""

    def __init__(self, loss: ProgressiveDistillationLoss) -> None:
        super().__init__()
        self.loss, self.event_shape = loss, loss.teacher.event_shape
        self.cond_event_dims = loss.teacher.cond_event_dims  # it takes the teacher's condition

    def forward(self, x_t: Tensor, t: Tensor, cond=None, drop_cond=None) -> tuple[Tensor, Tensor]:
        student_times = self.loss.grid[0::2]  # (N + 1,)
        index = (student_times[None, :] == t[:, None]).long().argmax(dim=1)  # (batch,)
        assert bool((student_times[index] == t).all())  # every call is at a student grid time
        return self.loss.target(x_t, index, cond, drop_cond), x_t


@pytest.mark.parametrize("shift", [1.0, 0.3, 3.0, 5.7])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 32])
def test_the_student_grid_is_every_other_teacher_grid_point(steps, shift):
    assert torch.equal(time_grid(steps, 0.0, shift), time_grid(2 * steps, 0.0, shift)[0::2])


def test_one_student_step_with_the_target_lands_where_two_teacher_steps_land():
    model = teacher()
    loss = ProgressiveDistillationLoss(model, teacher_steps=8, shift=3.0)
    x_t, cond = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    index = torch.tensor([1, 2, 3, 4, 4, 1])
    grid = time_grid(8, 0.0, 3.0)
    t, mid, end = grid[2 * index], grid[2 * index - 1], grid[2 * index - 2]
    x_mid = x_t + (mid - t)[:, None] * model(x_t, t, cond)[0]
    x_end = x_mid + (end - mid)[:, None] * model(x_mid, mid, cond)[0]
    target = loss.target(x_t, index, cond)
    torch.testing.assert_close(x_t + (end - t)[:, None] * target, x_end, rtol=0.0, atol=1e-6)
    # The copy of the teacher the student starts as is one Euler step: not yet the target.
    assert (model(x_t, t, cond)[0] - target).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_the_exact_student_has_zero_loss_and_samples_as_the_teacher(kind):
    model = teacher(kind)
    loss = ProgressiveDistillationLoss(model, teacher_steps=4, shift=2.0, cond_drop=0.5)
    student = ExactStudent(loss)
    x0, cond = torch.randn(6, *model.event_shape), torch.tensor([0, 1, 2, 0, 1, 2])
    assert loss(student, x0, cond, generator=torch.Generator().manual_seed(0)) == 0
    assert loss(copy.deepcopy(model), x0, cond) > 0
    noise = torch.randn(6, *model.event_shape)
    want = euler_sample(model, noise, 4, cond=cond, shift=2.0)
    torch.testing.assert_close(euler_sample(student, noise, 2, cond=cond, shift=2.0), want, rtol=0.0, atol=1e-5)


def test_the_teacher_is_frozen_and_the_student_trains():
    model = teacher()
    student = copy.deepcopy(model)
    loss = ProgressiveDistillationLoss(model, teacher_steps=16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loss(student, torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert loss.student_steps == 8


def test_distillation_rounds_halve_the_teacher_steps():
    assert distillation_rounds() == [64, 32, 16, 8]
    assert distillation_rounds(8, 4) == [8]
    assert distillation_rounds(48, 3) == [48, 24, 12, 6]
    for start, end in [(64, 5), (48, 4), (4, 4), (4, 8)]:
        with pytest.raises(ValueError, match=r"^\(start_steps, end_steps\): expected start_steps = end_steps \* 2"):
            distillation_rounds(start, end)
    with pytest.raises(ValueError, match=r"^end_steps: expected an integer >= 1, got 0"):
        distillation_rounds(8, 0)


def test_bad_inputs_name_the_argument():
    model = teacher()
    with pytest.raises(ValueError, match=r"^teacher_steps: expected an even integer >= 2, got 5"):
        ProgressiveDistillationLoss(model, teacher_steps=5)
    with pytest.raises(ValueError, match=r"^teacher_steps: expected an even integer >= 2, got 0"):
        ProgressiveDistillationLoss(model, teacher_steps=0)
    with pytest.raises(ValueError, match=r"^teacher: expected a velocity model"):
        ProgressiveDistillationLoss(lambda x, t: x, teacher_steps=4)
    loss = ProgressiveDistillationLoss(model, teacher_steps=4)
    with pytest.raises(ValueError, match=r"^student: expected the teacher's event shape \(2,\), got \(3,\)"):
        loss(MLPVelocity(3, width=8, depth=1, time_features=4), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"^x0: expected trailing shape \(2,\)"):
        loss(copy.deepcopy(model), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"^index: expected student steps in 1..2, got values in \[0, 2\]"):
        loss.target(torch.randn(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"^shift: expected a positive finite number"):
        ProgressiveDistillationLoss(model, teacher_steps=4, shift=0.0)
