r"""The fine-tuning objective: the trajectory NLL plus the mean alignment to the frozen flow-matching model, with
its weight decayed over the run (NTM §3.3, method.md 3.4, step 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..baselines.flow_matching import FlowMatchingLoss
from ..conditioning import Condition
from ..losses import TrajectoryNLL
from ..model import NTM
from ..process import MarkovInterpolant
from ..schedules import CosineWarmup

__all__ = ["MeanAlignmentLoss", "DEFAULT_DECAY_STEPS", "FinetuneLoss"]


@contextmanager
def _without_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Inside the block, operations on ``module``'s parameters record no gradient for them (autograd reads
    ``requires_grad`` when an operation runs); gradients still flow through its activations."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@contextmanager
def _record_calls(module: nn.Module) -> Iterator[list[tuple[tuple, dict, Any]]]:
    """Record ``(args, kwargs, output)`` of every call of ``module`` inside the block (a forward hook)."""
    calls: list[tuple[tuple, dict, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((args, kwargs, output))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _predictor_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Condition | None, Tensor | None]:
    """``(t, s, cond, drop_cond)`` of a recorded predictor call ``(u_t, t, s, cond, drop_cond)``."""
    names = ("u_t", "t", "s", "cond", "drop_cond")
    values = dict(zip(names, args))
    values.update(kwargs)
    return values["t"], values["s"], values.get("cond"), values.get("drop_cond")


@dataclass
class MeanAlignmentLoss:
    r"""Mean alignment :math:`\|\mu_P - \mu_{FM}\|^2` against a frozen flow-matching model (NTM §3.3).

    :math:`\mu_{FM} = A(t, s) x_t + B(t, s) (x_t - t v_{ref}(x_t, t, y))` reads **data space** :math:`x_t`,
    so the loss keeps the NTM's transporter space close to the pretrained model's. A mean over dimensions
    (the "MSE variant"), on the per-dimension scale of :class:`~trajflow.TrajectoryNLL`.

    Arguments:
        reference: The frozen velocity model ``(x_t, t, cond, drop_cond) -> (v, hidden)`` (see
            :func:`frozen_copy`); it is called without gradients.
    """

    reference: nn.Module

    @torch.no_grad()
    def mean(
        self, x_t: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        r""":math:`\mu_{FM}` for flat ``x_t`` ``(N, *event)``, ``t``/``s`` ``(N,)``; float32 or wider."""
        v = self.reference(x_t, t, cond, drop_cond)[0]
        dtype = torch.promote_types(v.dtype, torch.float32)
        A, B, _ = MarkovInterpolant.posterior(t.to(dtype), s.to(dtype), validate=False)
        shape = (x_t.shape[0], *([1] * (x_t.dim() - 1)))
        x = x_t.to(dtype)
        return A.reshape(shape) * x + B.reshape(shape) * (x - t.to(dtype).reshape(shape) * v.to(dtype))

    def __call__(
        self,
        mu: Tensor,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """The squared error per example, averaged over dims: ``(N,)`` for flat ``mu``, ``x_t`` ``(N, *event)``."""
        if mu.shape != x_t.shape:
            raise ValueError(f"mu: expected the shape of x_t {tuple(x_t.shape)}, got {tuple(mu.shape)}")
        target = self.mean(x_t, t, s, cond, drop_cond)
        return (mu - target.to(mu.dtype)).square().flatten(1).mean(-1)


#: ``FinetuneLoss.decay_steps`` when neither it nor ``decay_fraction`` is given.
DEFAULT_DECAY_STEPS = 10_000


def _unpack_batch(batch: Any) -> tuple[Tensor, Condition | None]:
    """``(x0, cond)`` of a batch that is ``x0`` or ``(x0, cond)`` (a list too: what a DataLoader collates)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) == 2 else None
    got = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ValueError(f"batch: expected a tensor x0 or a pair (x0, cond), got {got}")


def _count_or_none(v: object) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


def _share_or_none(v: object) -> bool:
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return v is None or (numeric and math.isfinite(v) and 0 < v <= 1)  # type: ignore[operator]


def _progress_or_none(v: object) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0)


# (field, check, what is expected, whether a failure shows the value's type rather than the value), checked in
# order by FinetuneLoss.__post_init__.
_FIELD_CHECKS: tuple[tuple[str, Callable[[Any], bool], str, bool], ...] = (
    ("nll", lambda v: isinstance(v, TrajectoryNLL), "a TrajectoryNLL", True),
    ("align", lambda v: isinstance(v, MeanAlignmentLoss), "a MeanAlignmentLoss", True),
    ("aux_weight", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", False),
    ("decay_steps", _count_or_none, "a positive integer or None", False),
    ("decay_fraction", _share_or_none, "a share of the run in (0, 1] or None", False),
    ("flow_matching_weight", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", False),
)


@dataclass
class FinetuneLoss:
    r"""Fine-tuning objective: :math:`\mathcal{L}_{NTM} + \lambda \, \mathcal{L}_{aux}` (NTM Algorithm 1).

    The NLL is :class:`~trajflow.TrajectoryNLL`'s (its ``steps``, ``t_min``, ``shift``, ``mode`` and
    ``cond_drop`` are used); :math:`\mathcal{L}_{aux}` is :class:`MeanAlignmentLoss` on the predictor's
    means of the same forward pass (one predictor evaluation per step), averaged over the factors used.
    :math:`\lambda` decays from ``aux_weight`` (NTM: 2.5) to 0 by a half cosine, :math:`\lambda =
    \text{aux\_weight} \cdot \tfrac12 (1 + \cos(\pi \min(r, 1)))`, with :math:`r` either

    * ``step / decay_steps``: a number of optimizer steps; or
    * ``progress / decay_fraction``: a share of the run, ``progress`` in [0, 1] as the
      :class:`~trajflow.train.Trainer` hands it (:meth:`~trajflow.train.TrainerConfig.run_progress`), for a
      time-budgeted run whose ``max_steps`` is only a cap.

    Give at most one of the two; with neither (``decay_steps=None``), :math:`\lambda` stays ``aux_weight``.

    With ``flow_matching_weight`` :math:`w > 0` the backbone keeps training as the flow-matching model it was:
    the objective is :math:`\mathcal{L}_{NTM} + \lambda \mathcal{L}_{aux} + w \mathcal{L}_{FM}` with
    :math:`\mathcal{L}_{FM}` the :class:`~trajflow.baselines.FlowMatchingLoss` of the predictor's velocity
    model (``model.predictor.velocity``) on the same images, and the NLL and the alignment taken with the
    velocity model's parameters out of the graph, so they train the transporter and :math:`\sigma_P` only.
    For a predictor that reads data space (``input_space="data"``), where the velocity model sees the
    ``x_t`` it was trained on (``docs/fewstep.md`` measures it).

    A :class:`~trajflow.train.Objective`: ``loss(model, batch, generator, step, progress=...)`` with ``batch``
    ``x0`` ``(B, *data)`` or ``(x0, cond)`` (what a DataLoader yields), returning ``(total, parts)`` with the
    detached ``"nll"`` (nats/dim), ``"aux"`` and ``"lambda"`` that the Trainer logs.

    Arguments:
        nll: The trajectory NLL.
        align: The mean alignment against the frozen reference.
        aux_weight: :math:`\lambda` at the start (NTM: 2.5).
        decay_steps: Optimizer steps over which :math:`\lambda` decays to 0; ``None``: no step-based decay.
            Default :data:`DEFAULT_DECAY_STEPS` (10,000), or ``None`` when ``decay_fraction`` is given.
        decay_fraction: Share of the run in (0, 1] over which :math:`\lambda` decays to 0 (1: the whole run);
            needs ``progress`` at each call.
        flow_matching_weight: :math:`w`, the weight of the velocity model's own flow-matching loss (above);
            0 (the default): the NLL and the alignment train every trainable parameter.

    Example:
        >>> from trajflow.finetune import init_from_flow_matching
        >>> from trajflow.velocity import MLPVelocity
        >>> model, ref = init_from_flow_matching(MLPVelocity(features=2, width=32))
        >>> loss = FinetuneLoss(TrajectoryNLL(steps=4), MeanAlignmentLoss(ref), decay_steps=100)
        >>> total, parts = loss(model, torch.randn(16, 2), step=0)
        >>> float(parts["aux"]), float(parts["lambda"])
        (0.0, 2.5)
        >>> by_share = FinetuneLoss(loss.nll, loss.align, decay_fraction=0.5)
        >>> by_share.lambda_at(progress=0.25), by_share.lambda_at(progress=0.75)
        (1.25, 0.0)
    """

    nll: TrajectoryNLL
    align: MeanAlignmentLoss
    aux_weight: float = 2.5
    # ``...`` marks "not given": the default depends on decay_fraction (resolved in __post_init__).
    decay_steps: int | None = ...  # type: ignore[assignment]
    decay_fraction: float | None = None
    flow_matching_weight: float = 0.0
    #: The loss's name in the Trainer's logs.
    loss_name: ClassVar[str] = "finetune_loss"

    def __post_init__(self) -> None:
        if self.decay_steps is ...:
            self.decay_steps = None if self.decay_fraction is not None else DEFAULT_DECAY_STEPS
        for name, ok, expected, by_type in _FIELD_CHECKS:  # in this order, each naming its field
            value = getattr(self, name)
            if not ok(value):
                shown = type(value).__name__ if by_type else repr(value)
                raise ValueError(f"{name}: expected {expected}, got {shown}")
        if self.decay_steps is not None and self.decay_fraction is not None:
            raise ValueError(
                f"decay_steps, decay_fraction: expected one decay schedule, got decay_steps={self.decay_steps!r} "
                f"and decay_fraction={self.decay_fraction!r}; decay by steps or by a share of the run, not both"
            )

    def lambda_at(self, step: int = 0, progress: float | None = None) -> float:
        """The auxiliary weight at optimizer step ``step`` (read with ``decay_steps``) and run progress
        ``progress`` in [0, 1] (required with ``decay_fraction``): a cosine to 0."""
        if not _progress_or_none(progress):
            raise ValueError(f"progress: expected the share of the run done, a number in [0, 1], got {progress!r}")
        if self.decay_fraction is not None:
            return self._lambda_by_share(progress)
        if self.decay_steps is None:
            return float(self.aux_weight)
        return float(self.aux_weight * CosineWarmup(0, self.decay_steps)(max(int(step), 0)))

    def _lambda_by_share(self, progress: float | None) -> float:
        if progress is None:
            raise ValueError(
                f"progress: FinetuneLoss(decay_fraction={self.decay_fraction}) follows the run's progress in "
                "[0, 1], got None; the Trainer passes it (see trajflow.train.Objective), or pass progress="
            )
        share = min(progress / self.decay_fraction, 1.0)  # type: ignore[operator]
        return float(self.aux_weight * 0.5 * (1.0 + math.cos(math.pi * share)))

    def per_example(
        self,
        model: NTM,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(nll, aux)``, each ``(B,)``, for a flat batch ``x0`` ``(B, *data)``."""
        nll = self.nll
        n, device = x0.shape[0], x0.device
        out_nll, out_aux = torch.empty(n, device=device), torch.empty(n, device=device)
        for group in nll.draw(model, x0, cond, generator=generator):
            m, T, traj = group.index.numel(), group.steps, group.traj
            with _record_calls(model.predictor) as calls:
                out_nll[group.index] = nll.group_nll(group)
            if nll.mode == "trajectory":
                x_t = traj[:, 1:].reshape(m * T, *model.event_shape)  # levels 1..T, the predictor's flat order
                per = T
            else:
                x_t = traj[torch.arange(m, device=device), group.k]  # (m, *data)
                per = 1
            if len(calls) != 1:
                raise RuntimeError(f"FinetuneLoss: expected one predictor call per NLL evaluation, saw {len(calls)}")
            args, kwargs, (mu, _) = calls[0]
            t, s, flat_cond, flat_drop = _predictor_inputs(args, kwargs)
            aux = self.align(mu, x_t, t, s, flat_cond, flat_drop)  # (m * per,)
            out_aux[group.index] = aux.reshape(m, per).mean(-1)
        return out_nll, out_aux

    def __call__(
        self,
        model: NTM,
        batch: Tensor | tuple[Tensor, Condition | None] | list,
        generator: torch.Generator | None = None,
        step: int = 0,
        *,
        progress: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, {"nll", "aux", "lambda"})`` for ``batch`` = ``x0`` or ``(x0, cond)`` (see the class)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            # The old call form loss(model, x0, cond, step) put the condition here.
            raise ValueError(
                f"generator: expected a torch.Generator or None, got {type(generator).__name__}; a condition goes "
                "in the batch: loss(model, (x0, cond), generator, step)"
            )
        x0, cond = _unpack_batch(batch)
        lam = self.lambda_at(step, progress)
        velocity = self._velocity_of(model) if self.flow_matching_weight > 0 else None
        with _without_parameter_grads(velocity) if velocity is not None else nullcontext():
            nll, aux = self.per_example(model, x0, cond, generator=generator)
        nll, aux = nll.mean(), aux.mean()
        total = nll + lam * aux
        parts = {"nll": nll.detach(), "aux": aux.detach(), "lambda": torch.tensor(lam, device=x0.device)}
        if velocity is not None:
            fm = FlowMatchingLoss(cond_drop=self.nll.cond_drop)(velocity, x0, cond, generator=generator)
            total = total + self.flow_matching_weight * fm
            parts["fm"] = fm.detach()
        return total, parts

    @staticmethod
    def _velocity_of(model: NTM) -> nn.Module:
        """The velocity model a positive ``flow_matching_weight`` trains: a data-space predictor's, trainable."""
        velocity, space = getattr(model.predictor, "velocity", None), model.predictor.input_space
        if not isinstance(velocity, nn.Module) or space != "data":
            raise ValueError(
                "model.predictor: flow_matching_weight > 0 trains the predictor's velocity model on x_t; expected a "
                f"FlowMatchingPredictor with input_space='data', got {type(model.predictor).__name__} with "
                f"input_space={space!r}"
            )
        if not any(p.requires_grad for p in velocity.parameters()):
            raise ValueError(
                "model.predictor.velocity: flow_matching_weight > 0 trains it; expected trainable parameters, got "
                "none with requires_grad (a frozen backbone: unfreeze it, or set flow_matching_weight=0)"
            )
        return velocity
