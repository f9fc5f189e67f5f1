r"""Training losses. Each is a small dataclass called as ``loss(model, x0, cond)`` (NVlabs/edm style).

:class:`TrajectoryNLL` is NTM's objective (NTM Eq. 3.4, Algorithm 1): the exact negative log-likelihood
of trajectories drawn from the Markov forward process, reported per dimension.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .checks import check_finite, check_number, check_tensor
from .conditioning import Condition, check_cond, map_cond
from .process import TRAIN_T_MIN, MarkovInterpolant, sample_t_min, time_grid

if TYPE_CHECKING:  # the distribution imports predictors, whose FM wrapper imports this module
    from .distribution import TrajectoryDistribution

__all__ = ["TrajectoryNLL", "TrajectoryGroup", "index_cond", "guidance_dropout"]


def index_cond(cond: Condition | None, event_dims, index: Tensor) -> Condition | None:
    """Select the examples ``index`` of a flat-batched condition (a tensor or a tuple of tensors)."""
    if cond is None:
        return None
    return map_cond(lambda c, ed: c[index], cond, event_dims)


def guidance_dropout(n: int, p: float, device: torch.device, generator: torch.Generator | None) -> Tensor | None:
    """A ``(n,)`` bool mask, True with probability ``p``: examples trained with the null condition."""
    if p <= 0:
        return None
    return torch.rand(n, device=device, generator=generator) < p


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _steps_set(steps: object) -> tuple[int, ...]:
    """``steps`` (an int or a set of them) as a tuple, or a ``ValueError`` naming ``steps``."""
    values = (steps,) if _is_int(steps) else steps
    collection = isinstance(values, (tuple, list, set, frozenset, range))
    if not collection or not values or any(not _is_int(s) or s < 1 for s in values):  # type: ignore[union-attr]
        raise ValueError(f"steps: expected a positive integer or a set of them, got {steps!r}")
    return tuple(values)  # type: ignore[arg-type]


def check_probability(name: str, p: object) -> float:
    """Raise unless ``p`` is a probability in [0, 1) (of dropping a condition)."""
    if check_number(name, p, low=0.0) >= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")
    return float(p)  # type: ignore[arg-type]


def t_min_range(t_min: object) -> tuple[float, float]:
    """``t_min`` (a number or a range) as ``(low, high)`` with ``0 <= low <= high < 1``."""
    if isinstance(t_min, numbers.Real) and not isinstance(t_min, bool):
        t_min_range: object = (t_min, t_min)  # a fixed t_min
    else:
        t_min_range = t_min
    if not (isinstance(t_min_range, (tuple, list)) and len(t_min_range) == 2):
        raise ValueError(f"t_min: expected a number or a range (low, high), got {t_min!r}")
    lo, hi = (check_number("t_min", v) for v in t_min_range)
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"t_min: expected a range 0 <= low <= high < 1, got {t_min}")
    return lo, hi


def _fixed_weights(factor_weights: object, steps: tuple[int, ...], given_steps: object) -> Tensor | None:
    """A list of factor weights checked and normalised to mean 1 (float64); ``None`` for ``None`` or
    ``"velocity"`` (computed per grid); a ``ValueError`` naming ``factor_weights`` otherwise."""
    if factor_weights is None or (isinstance(factor_weights, str) and factor_weights == "velocity"):
        return None
    if isinstance(factor_weights, (str, bytes)) or not isinstance(factor_weights, Sequence):
        raise ValueError(f"factor_weights: expected None, a list of weights or 'velocity', got {factor_weights!r}")
    w = [check_number("factor_weights", v) for v in factor_weights]
    _check_weight_count(w, steps, given_steps)
    if min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"factor_weights: expected finite weights >= 0, not all zero, got {w}")
    return torch.tensor(w, dtype=torch.float64) * (len(w) / sum(w))  # mean 1


def _check_weight_count(w: list[float], steps: tuple[int, ...], given_steps: object) -> None:
    """One weight per step factor of a single ``T``."""
    if len(steps) != 1 or len(w) != steps[0]:
        want = steps[0] if len(steps) == 1 else "a single T"
        raise ValueError(
            f"factor_weights: expected one weight per step factor ({want} with steps={given_steps!r}), "
            f"got {len(w)} weights"
        )


def _checked_x0(model, x0: Tensor, validate: bool) -> Tensor:
    """``x0`` checked against the model's event shape (non-empty, real-valued; finite with ``validate``) and in
    the dtype of the model's parameters: draws and trajectories are in the model's dtype, whatever the data's."""
    event = model.event_shape
    check_tensor("x0", x0)
    if x0.dim() != len(event) + 1 or x0.shape[1:] != event:
        raise ValueError(f"x0: expected shape (batch, {', '.join(map(str, event))}), got {tuple(x0.shape)}")
    if x0.shape[0] == 0:
        raise ValueError(f"x0: expected a non-empty batch (the loss is a mean over it), got shape {tuple(x0.shape)}")
    if x0.dtype == torch.bool or x0.is_complex():
        raise ValueError(f"x0: expected a real-valued (floating-point or integer) tensor, got dtype {x0.dtype}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x0 = x0.to(dtype)
    if validate:
        check_finite("x0", x0)
    return x0


@dataclass
class TrajectoryGroup:
    """Training trajectories of the examples of a batch that share one number of steps ``T``.

    Attributes:
        index: Positions of the examples in the flat batch, ``(m,)``.
        steps: Their number of steps ``T``.
        dist: Their trajectory distribution (batch ``(m,)``: one grid, condition and dropout each).
        traj: Their forward trajectories, ``(m, T + 1, *data)``.
        k: In pair mode, the factor evaluated for each, ``(m,)`` in ``1..T``; else ``None``.
    """

    index: Tensor
    steps: int
    dist: TrajectoryDistribution
    traj: Tensor
    k: Tensor | None = None


@dataclass
class TrajectoryNLL:
    r"""The exact trajectory NLL of an NTM in nats per dimension.

    For each example of a non-empty batch ``x0`` ``(B, *data)`` (any real dtype, cast to the model's): draw
    :math:`t_{\min} \sim U[\text{t\_min}]` (and :math:`T` from ``steps`` when it is a set: the batch is split
    into equal groups over a random permutation, so each example's :math:`T` is uniform and no size is read
    from the device), build the grid, draw the forward trajectory and evaluate
    :math:`-\log p(x_{t_0}, \dots, x_{t_T})`.

    Arguments:
        steps: The number of steps :math:`T`, or a set of them to draw per example (e.g. ``(4, 8, 16)``).
        t_min: The range ``(low, high)`` of the per-example :math:`t_{\min}`, ``0 <= low <= high < 1``
            (default :data:`~trajflow.process.TRAIN_T_MIN`); a single number is a fixed :math:`t_{\min}`.
        shift: The grid's shift factor (see :func:`trajflow.time_grid`).
        mode: ``"trajectory"``: all :math:`T` factors, divided by :math:`(T + 1) D`; ``"pair"``: one random
            factor per example, divided by :math:`D`. Both are unbiased estimates of the same objective up to a
            constant (both maximise :meth:`TrajectoryDistribution.elbo`); a pair step runs the predictor once
            instead of :math:`T` times, and at equal wall-clock time gave better bounds (``docs/bpd.md``).
        cond_drop: Probability of training an example with the null condition (guidance dropout).
        factor_weights: Weights of the step factors :math:`-\log p(x_{t_{k-1}} | x_{t_k})`, ``k = 1..T``:
            ``None`` (the exact NLL), a list :math:`w_1, \dots, w_T` (one fixed ``steps`` only; :math:`w_T`
            weights the step from noise), or ``"velocity"``: :math:`w_k \propto C^2 / (B^2 t_k^2)`
            (:meth:`MarkovInterpolant.posterior` of :math:`(t_k, t_{k-1})`), flow matching's emphasis
            across levels, since a mean error :math:`\delta` costs :math:`B^2 \delta^2 / (2 C^2)` in factor
            ``k`` but :math:`\delta^2 / t^2` in the velocity loss. Weights are normalised to mean 1 per
            example; every factor stays an exact flow likelihood, and both modes have the same expectation.
        validate_args: Check the values of ``x0`` (finite) and of the grids, a GPU synchronisation each;
            with ``False`` the loss makes none (given networks built with ``validate_args=False``). Shapes
            are always checked, and the draws, hence the loss, are the same bit for bit either way.

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> loss = TrajectoryNLL(steps=4)(model, torch.randn(32, 2))
        >>> loss.shape
        torch.Size([])
    """

    steps: int | Sequence[int] = 4
    t_min: tuple[float, float] | float = TRAIN_T_MIN
    shift: float = 1.0
    mode: str = "trajectory"
    cond_drop: float = 0.1
    factor_weights: Sequence[float] | str | None = None
    validate_args: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("trajectory", "pair"):
            raise ValueError(f"mode: expected 'trajectory' or 'pair', got {self.mode!r}")
        check_number("shift", self.shift, positive=True)
        check_probability("cond_drop", self.cond_drop)
        if not isinstance(self.validate_args, bool):
            raise ValueError(f"validate_args: expected a bool, got {self.validate_args!r}")
        self._steps = _steps_set(self.steps)
        self.t_min = t_min_range(self.t_min)
        self._weights = _fixed_weights(self.factor_weights, self._steps, self.steps)

    def weights(self, grid: Tensor) -> Tensor | None:
        """The factor weights for grids ``(m, T + 1)``: ``(m, T)`` with mean 1 per row (``None``: unweighted)."""
        if self.factor_weights is None:
            return None
        if self._weights is not None:
            return self._weights.to(grid.device, torch.float32).expand(grid.shape[0], -1)
        t, s = grid[:, 1:].double(), grid[:, :-1].double()
        _, B, C = MarkovInterpolant.posterior(t, s, validate=False)
        # C = 0 (t_min = 0 at the last step) would weight that factor 0: floor it at a tiny share instead.
        w = (C.square() / (B.square() * t.square())).clamp_min(1e-12)
        return (w / w.mean(-1, keepdim=True)).float()

    def draw(
        self,
        model,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        validate: bool | None = None,
    ) -> list[TrajectoryGroup]:
        r"""The training trajectories of a flat batch ``x0`` ``(B, *data)``, grouped by their ``T`` (where other
        losses on the same draws, e.g. :class:`trajflow.finetune.FinetuneLoss`, start). ``validate`` overrides
        :attr:`validate_args` for this call."""
        validate = self.validate_args if validate is None else validate
        x0 = _checked_x0(model, x0, validate)
        check_cond(model, cond, x0.shape[:1], validate=validate)
        n, device = x0.shape[0], x0.device
        process = MarkovInterpolant(event_dim=len(model.event_shape))
        return [
            self._draw_group(model, x0, cond, process, T, index, generator, validate)
            for T, index in self._groups(n, device, generator)
        ]

    def _draw_group(
        self,
        model,
        x0: Tensor,
        cond: Condition | None,
        process: MarkovInterpolant,
        T: int,
        index: Tensor | None,
        generator: torch.Generator | None,
        validate: bool,
    ) -> TrajectoryGroup:
        r"""The trajectories of the examples ``index`` of ``x0`` (``None``: all) with ``T`` steps: their
        :math:`t_{\min}`, grid, dropout, distribution, forward trajectory and (pair mode) factor, in that order
        of draws."""
        n, device = x0.shape[0], x0.device
        m = n if index is None else index.numel()
        t0 = sample_t_min((m,), *self.t_min, generator=generator, device=device)
        grid = time_grid(T, t0, self.shift, device=device, validate=validate)  # (m, T+1)
        drop = guidance_dropout(m, self.cond_drop if cond is not None else 0.0, device, generator)
        group_cond = cond if index is None else index_cond(cond, model.predictor.cond_event_dims, index)
        dist = model.distribution(grid, group_cond, drop_cond=drop, validate_args=validate)
        x = x0 if index is None else x0[index]
        traj = process.sample(x, grid, generator=generator, validate=validate)  # (m, T+1, *data)
        if index is None:
            index = torch.arange(n, device=device)
        k = None
        if self.mode == "pair":
            k = torch.randint(1, T + 1, (m,), device=device, generator=generator)
        return TrajectoryGroup(index, T, dist, traj, k)

    def _groups(
        self, n: int, device: torch.device, generator: torch.Generator | None
    ) -> list[tuple[int, Tensor | None]]:
        """``(T, index)`` per group of examples (``index`` ``None``: every example, one ``T``): equal groups over a
        random permutation, whose sizes never depend on the draws."""
        if len(self._steps) == 1:
            return [(self._steps[0], None)]
        perm = torch.randperm(n, device=device, generator=generator)
        bounds = [i * n // len(self._steps) for i in range(len(self._steps) + 1)]
        return [(T, perm[a:b]) for T, a, b in zip(self._steps, bounds[:-1], bounds[1:]) if b > a]

    def group_nll(self, group: TrajectoryGroup) -> Tensor:
        """The NLL in nats/dim of each trajectory of a group, ``(m,)`` (see ``mode``)."""
        dims = group.dist.data_shape.numel()
        w = self.weights(group.dist.grid.reshape(-1, group.steps + 1).expand(group.traj.shape[0], -1))
        if self.mode == "trajectory" and w is not None:
            prior, factors = group.dist.log_prob_factors(group.traj)  # (m,), (m, T)
            return -(prior + (factors * w).sum(-1)) / ((group.steps + 1) * dims)
        if self.mode == "trajectory":
            return -group.dist.log_prob(group.traj) / ((group.steps + 1) * dims)
        nll = -group.dist.pair_log_prob(group.traj, group.k) / dims
        return nll if w is None else nll * w.gather(1, group.k[:, None] - 1).squeeze(1)

    def per_example(
        self,
        model,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        validate: bool | None = None,
    ) -> Tensor:
        """The NLL in nats/dim of each example of a flat batch ``x0`` of shape ``(B, *data)``; ``(B,)``.

        ``validate`` overrides :attr:`validate_args` for this call."""
        groups = self.draw(model, x0, cond, generator=generator, validate=validate)
        if len(self._steps) == 1:
            return self.group_nll(groups[0])  # the one group holds every example, in order
        out = torch.empty(x0.shape[0], device=x0.device)
        for group in groups:
            out[group.index] = self.group_nll(group)
        return out

    def __call__(
        self, model, x0: Tensor, cond: Condition | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        return self.per_example(model, x0, cond, generator=generator).mean()
