r"""Initialising an NTM from a pretrained flow-matching model, and the mean-alignment loss (NTM §3.3).

Recipe (method.md 3.4):

1. Wrap the velocity model in :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor`:
   :math:`\mu_P = A u_t + B (u_t - t v)`, :math:`\sigma_P = C e^{\delta_\sigma}` with a zero-initialised
   :math:`\delta_\sigma`.
2. Use a transporter that is **exactly the identity at initialisation** (:func:`identity_transporter`):
   for images the TarFlow-style :class:`~trajflow.transporters.transformer.TransformerTransporter` (its
   heads are zero-initialised); for vectors a zuko MAF whose hyper-networks' last layers are zeroed
   (:func:`zero_init_zuko_`; a zero MAF step is ``x * exp(0) + 0``). :func:`check_identity` verifies it.
   Then the NTM's every step *is* the flow-matching model's Gaussian posterior sampler
   :math:`\mathcal{N}(A x_t + B (x_t - t v(x_t)), C^2)` (tested exactly in ``tests/test_finetune.py``).
3. Train with :class:`FinetuneLoss`: the trajectory NLL plus
   :math:`\lambda \sum_k \|\mu_P^{(k)} - \mu_{FM}^{(k)}\|^2`, where
   :math:`\mu_{FM} = A x_t + B (x_t - t v_{frozen}(x_t, t, y))` comes from a frozen copy of the velocity
   model reading data space, and :math:`\lambda` = 2.5 decays by a cosine to 0 (over a number of steps, or
   over a share of the run, which also follows a time budget). It is a :class:`~trajflow.train.Trainer`
   objective as it stands: ``Trainer(cfg, out).fit(model, FinetuneLoss(...), dataset)``.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3, Eqs. 3.6-3.8, App. A.3, A.5, Table 4-5.
    | https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .conditioning import Condition
from .losses import TrajectoryNLL
from .model import NTM
from .predictors.from_velocity import FlowMatchingPredictor
from .process import MarkovInterpolant
from .schedules import CosineWarmup
from .transporters.base import Transporter
from .transporters.transformer import TransformerTransporter, TransformerTransporterConfig
from .transporters.zuko import ZukoTransporter

__all__ = [
    "identity_transporter",
    "zero_init_zuko_",
    "check_identity",
    "frozen_copy",
    "FlowMatchingInit",
    "init_from_flow_matching",
    "MeanAlignmentLoss",
    "FinetuneLoss",
    "DEFAULT_DECAY_STEPS",
]


# -- transporters that start as the identity ------------------------------------------------------------------


def zero_init_zuko_(transporter: ZukoTransporter) -> ZukoTransporter:
    r"""Zero the last layer of every hyper-network of a zuko transporter, in place; returns it.

    For ``preset="maf"`` (affine autoregressive steps) this makes the transporter *exactly* the identity:
    each step computes ``x * exp(0) + 0``, with a zero log-determinant. For ``preset="nsf"`` it is the
    identity only up to float rounding (about 1e-7: a spline with uniform bins and unit derivatives).
    Gradients still reach every layer once the last one moves away from zero.
    """
    if not isinstance(transporter, ZukoTransporter):
        raise ValueError(f"transporter: expected a ZukoTransporter, got {type(transporter).__name__}")
    found = 0
    for module in transporter.flow.modules():
        hyper = getattr(module, "hyper", None)
        if isinstance(hyper, nn.Module):
            linears = [m for m in hyper.modules() if isinstance(m, nn.Linear)]
            if linears:
                nn.init.zeros_(linears[-1].weight)
                if linears[-1].bias is not None:
                    nn.init.zeros_(linears[-1].bias)
                found += 1
    if not found:
        raise ValueError(
            "transporter: found no zuko hyper-network to zero (expected MaskedAutoregressiveTransform "
            "steps, e.g. ZukoTransporter(preset='maf'))"
        )
    return transporter


def identity_transporter(event_shape: int | Sequence[int], **kwargs: Any) -> Transporter:
    r"""A learnable transporter that is exactly the identity at initialisation.

    Arguments:
        event_shape: ``features`` (or ``(features,)``) for vectors, ``(C, H, W)`` for images.
        **kwargs: For vectors, keyword arguments of :class:`~trajflow.transporters.ZukoTransporter`
            (``transforms``, ``hidden_features``, ...; the preset is MAF); for images, fields of
            :class:`~trajflow.transporters.transformer.TransformerTransporterConfig` (``patch_size``,
            ``width``, ``layers_per_block``, ...).

    Example:
        >>> f = identity_transporter(2)
        >>> x, t = torch.randn(3, 2), torch.rand(3)
        >>> u, ladj = f(x, t)
        >>> torch.equal(u, x), bool((ladj == 0).all())
        (True, True)
    """
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    if len(shape) == 1:
        kwargs.setdefault("preset", "maf")
        if kwargs["preset"] != "maf":
            raise ValueError(f"preset: only 'maf' starts as the exact identity, got {kwargs['preset']!r}")
        return zero_init_zuko_(ZukoTransporter(shape[0], **kwargs))
    if len(shape) == 3:
        return TransformerTransporter(TransformerTransporterConfig(shape, **kwargs))  # zero heads: identity
    raise ValueError(f"event_shape: expected (features,) or (C, H, W), got {shape}")


@torch.no_grad()
def check_identity(
    transporter: Transporter,
    *,
    atol: float = 0.0,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> None:
    r"""Raise a :class:`ValueError` unless ``transporter(x, t) == (x, 0)`` within ``atol`` on random inputs.

    Checks ``num_samples`` points :math:`x \sim \mathcal{N}(0, 4 I)` at times spread over [0, 1] (a
    conditional transporter at the null context).
    """
    if not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter, got {type(transporter).__name__}")
    device = next((p.device for p in transporter.parameters()), torch.device("cpu"))
    x = 2.0 * torch.randn(num_samples, *transporter.event_shape, generator=generator).to(device)
    t = torch.linspace(0.0, 0.99, num_samples, device=device)
    # cond=None: a conditional transporter at the null context (its zero-initialised condition projections
    # make every context give the same map at initialisation).
    u, ladj = transporter(x, t, None, None)
    err, lerr = float((u - x).abs().max()), float(ladj.abs().max())
    if err > atol or lerr > atol:
        raise ValueError(
            f"transporter: expected the identity at initialisation (within atol={atol:g}), got "
            f"max |f(x, t) - x| = {err:.3g} and max |log det| = {lerr:.3g}; use identity_transporter(...) or "
            "zero_init_zuko_(...) (a default ZukoTransporter is not the identity)"
        )


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off, in eval mode (the mean-alignment reference)."""
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    return ref.eval()


class FlowMatchingInit(NamedTuple):
    """What :func:`init_from_flow_matching` returns."""

    model: NTM
    """The NTM: identity transporter + :class:`FlowMatchingPredictor` around the (trainable) velocity model."""
    reference: nn.Module
    """A frozen deep copy of the velocity model, for :class:`MeanAlignmentLoss`."""


def init_from_flow_matching(
    velocity: nn.Module,
    transporter: Transporter | None = None,
    *,
    atol: float = 1e-6,
    transporter_kwargs: dict[str, Any] | None = None,
    **predictor_kwargs: Any,
) -> FlowMatchingInit:
    r"""Build an NTM initialised from a flow-matching velocity model (NTM §3.3).

    Arguments:
        velocity: The pretrained velocity model (see :class:`FlowMatchingPredictor`); it becomes the
            trainable backbone of the predictor. A frozen deep copy is made first (the reference).
        transporter: A transporter that is the identity at initialisation, on the velocity model's
            ``event_shape``; ``None`` builds one with :func:`identity_transporter` from
            ``transporter_kwargs``. It is checked with :func:`check_identity` (tolerance ``atol``).
        transporter_kwargs: Keyword arguments of :func:`identity_transporter`.
        **predictor_kwargs: Keyword arguments of :class:`FlowMatchingPredictor` (``c_min``, ``delta_mean``,
            ``time_features``, ...).

    Raises:
        ValueError: The transporter is not the identity, or its event shape differs from the velocity
            model's (both named).

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> model, reference = init_from_flow_matching(MLPVelocity(features=2, width=32))
        >>> model.sample((5,), steps=4).shape
        torch.Size([5, 2])
    """
    reference = frozen_copy(velocity)
    predictor = FlowMatchingPredictor(velocity, **predictor_kwargs)
    if transporter is None:
        transporter = identity_transporter(predictor.event_shape, **(transporter_kwargs or {}))
    elif transporter_kwargs:
        raise ValueError("transporter_kwargs: only used when transporter is None")
    elif not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter or None, got {type(transporter).__name__}")
    elif torch.Size(transporter.event_shape) != torch.Size(predictor.event_shape):
        # Checked before check_identity, whose random probe would otherwise fail on the shape with a less clear error.
        raise ValueError(
            f"transporter: expected the velocity model's event_shape {tuple(predictor.event_shape)}, got a "
            f"transporter on event_shape {tuple(transporter.event_shape)}"
        )
    check_identity(transporter, atol=atol)
    device = next((p.device for p in velocity.parameters()), None)
    if device is not None:
        transporter = transporter.to(device)
    return FlowMatchingInit(NTM(transporter, predictor), reference)


# -- the losses ---------------------------------------------------------------------------------------------------


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

    :math:`\mu_{FM} = A(t, s) x_t + B(t, s) (x_t - t v_{ref}(x_t, t, y))` reads **data space**
    :math:`x_t`, while the NTM's :math:`\mu_P` lives in transporter space; the loss keeps the latter close
    to the pretrained model's space. Reported as a mean over dimensions (the "MSE variant"), so it is on
    the per-dimension scale of :class:`~trajflow.TrajectoryNLL`.

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


@dataclass
class FinetuneLoss:
    r"""Fine-tuning objective: :math:`\mathcal{L}_{NTM} + \lambda \, \mathcal{L}_{aux}` (NTM Algorithm 1).

    The NLL is :class:`~trajflow.TrajectoryNLL`'s (its ``steps``, ``t_min``, ``shift``, ``mode`` and
    ``cond_drop`` are used); :math:`\mathcal{L}_{aux}` is :class:`MeanAlignmentLoss` on the predictor's
    means of the same forward pass (one predictor evaluation per step), averaged over the factors used.
    :math:`\lambda` decays from ``aux_weight`` (NTM: 2.5) to 0 by a half cosine, :math:`\lambda =
    \text{aux\_weight} \cdot \tfrac12 (1 + \cos(\pi \min(r, 1)))`, with :math:`r` either

    * ``step / decay_steps``: a number of optimizer steps; or
    * ``progress / decay_fraction``: a share of the run, with ``progress`` in [0, 1] as the
      :class:`~trajflow.train.Trainer` hands it to objectives (:meth:`~trajflow.train.TrainerConfig.run_progress`:
      the share of ``train.steps`` or of ``train.time_budget`` done, whichever is larger). Use this for a
      time-budgeted run, whose ``steps`` is only a cap it never reaches.

    Give at most one of the two; with neither (``decay_steps=None``), :math:`\lambda` stays ``aux_weight``.

    Called as a :class:`~trajflow.train.Objective`: ``loss(model, batch, generator, step, progress=...)`` with
    ``batch`` a tensor ``x0`` ``(B, *data)`` or a pair ``(x0, cond)`` (what a DataLoader over a
    ``TensorDataset(x0)`` or ``TensorDataset(x0, labels)`` yields), so it goes to
    :meth:`Trainer.fit <trajflow.train.Trainer.fit>` as it stands (or inside
    :class:`~trajflow.likelihood.DequantizedObjective`). Returns ``(total, parts)`` with ``parts`` holding the
    detached ``"nll"`` (nats/dim), ``"aux"`` and ``"lambda"``, which the Trainer logs.

    Arguments:
        nll: The trajectory NLL.
        align: The mean alignment against the frozen reference.
        aux_weight: :math:`\lambda` at the start (NTM: 2.5).
        decay_steps: Optimizer steps over which :math:`\lambda` decays to 0; ``None``: no step-based decay.
            Default :data:`DEFAULT_DECAY_STEPS` (10,000), or ``None`` when ``decay_fraction`` is given.
        decay_fraction: Share of the run in (0, 1] over which :math:`\lambda` decays to 0 (1: the whole run);
            needs ``progress`` at each call.

    Example:
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
    #: The loss's name in the Trainer's logs.
    loss_name: ClassVar[str] = "finetune_loss"

    def __post_init__(self) -> None:
        if not isinstance(self.nll, TrajectoryNLL):
            raise ValueError(f"nll: expected a TrajectoryNLL, got {type(self.nll).__name__}")
        if not isinstance(self.align, MeanAlignmentLoss):
            raise ValueError(f"align: expected a MeanAlignmentLoss, got {type(self.align).__name__}")
        if not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"aux_weight: expected a finite number >= 0, got {self.aux_weight!r}")
        if self.decay_steps is ...:
            self.decay_steps = None if self.decay_fraction is not None else DEFAULT_DECAY_STEPS
        if self.decay_steps is not None and (
            not isinstance(self.decay_steps, int) or isinstance(self.decay_steps, bool) or self.decay_steps < 1
        ):
            raise ValueError(f"decay_steps: expected a positive integer or None, got {self.decay_steps!r}")
        f = self.decay_fraction
        if f is not None and (
            isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and 0 < f <= 1)
        ):
            raise ValueError(f"decay_fraction: expected a share of the run in (0, 1] or None, got {f!r}")
        if self.decay_steps is not None and f is not None:
            raise ValueError(
                f"decay_steps, decay_fraction: expected one decay schedule, got decay_steps={self.decay_steps!r} "
                f"and decay_fraction={f!r}; decay by steps or by a share of the run, not both"
            )

    def lambda_at(self, step: int = 0, progress: float | None = None) -> float:
        """The auxiliary weight at optimizer step ``step`` and run progress ``progress`` (a cosine to 0).

        ``step`` is read with ``decay_steps``, ``progress`` (in [0, 1], required) with ``decay_fraction``.
        """
        if progress is not None and (
            isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0
        ):
            raise ValueError(f"progress: expected the share of the run done, a number in [0, 1], got {progress!r}")
        if self.decay_fraction is not None:
            if progress is None:
                raise ValueError(
                    f"progress: FinetuneLoss(decay_fraction={self.decay_fraction}) follows the run's progress in "
                    "[0, 1], got None; the Trainer passes it (see trajflow.train.Objective), or pass progress="
                )
            share = min(progress / self.decay_fraction, 1.0)
            return float(self.aux_weight * 0.5 * (1.0 + math.cos(math.pi * share)))
        if self.decay_steps is None:
            return float(self.aux_weight)
        return float(self.aux_weight * CosineWarmup(0, self.decay_steps)(max(int(step), 0)))

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
        nll, aux = self.per_example(model, x0, cond, generator=generator)
        nll, aux = nll.mean(), aux.mean()
        total = nll + lam * aux
        return total, {"nll": nll.detach(), "aux": aux.detach(), "lambda": torch.tensor(lam, device=x0.device)}
