r"""Training losses. Each is a small dataclass called as ``loss(model, x0, cond)`` (NVlabs/edm style).

:class:`TrajectoryNLL` is NTM's objective (NTM Eq. 3.4, Algorithm 1): the exact negative log-likelihood
of trajectories drawn from the Markov forward process, reported per dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .checks import check_finite, check_tensor
from .conditioning import Condition, map_cond
from .process import MarkovInterpolant, sample_t_min, time_grid

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

    For each example: draw :math:`t_{\min} \sim U[\text{t\_min}]` (and :math:`T` from ``steps`` when it
    is a set: multi-T training), build the grid, draw the forward trajectory, and evaluate
    :math:`-\log p(x_{t_0}, \dots, x_{t_T})`.

    Arguments:
        steps: The number of steps :math:`T`, or a set of them to draw per example (e.g. ``(4, 8, 16)``).
        t_min: The range of the per-example :math:`t_{\min}` (NTM uses (0, 0.05)).
        shift: The grid's shift factor (see :func:`trajflow.time_grid`).
        mode: ``"trajectory"``: all :math:`T` factors, divided by :math:`(T + 1) D` (end-to-end);
            ``"pair"``: one random factor per example, divided by :math:`D` (pair-wise). Both are unbiased
            estimates of the same objective up to a constant factor (:math:`k` is uniform), so both maximise
            the ELBO of :meth:`TrajectoryDistribution.elbo`. A pair step runs the transporter on two levels and
            the predictor once instead of :math:`T` times, about 3x cheaper per iteration at :math:`T = 4`;
            at equal wall-clock time it gave clearly better likelihood bounds on 8x8 digits (``docs/bpd.md``).
        cond_drop: Probability of training an example with the null condition (guidance dropout).

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> loss = TrajectoryNLL(steps=4)(model, torch.randn(32, 2))
        >>> loss.shape
        torch.Size([])
    """

    steps: int | Sequence[int] = 4
    t_min: tuple[float, float] = (0.0, 0.05)
    shift: float = 1.0
    mode: str = "trajectory"
    cond_drop: float = 0.1

    def __post_init__(self) -> None:
        steps = (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"steps: expected a positive integer or a set of them, got {self.steps!r}")
        if self.mode not in ("trajectory", "pair"):
            raise ValueError(f"mode: expected 'trajectory' or 'pair', got {self.mode!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop: expected a probability in [0, 1), got {self.cond_drop}")
        lo, hi = self.t_min
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"t_min: expected a range 0 <= low <= high < 1, got {self.t_min}")
        self._steps = steps

    def draw(
        self,
        model,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> list[TrajectoryGroup]:
        r"""Draw the training trajectories of a flat batch ``x0`` ``(B, *data)``, grouped by their ``T``.

        Each example gets its own :math:`t_{\min}` (and :math:`T` when ``steps`` is a set), guidance
        dropout and forward trajectory. Other losses on the same draws (e.g.
        :class:`trajflow.finetune.FinetuneLoss`) start from here.
        """
        event = model.event_shape
        check_tensor("x0", x0)
        if x0.dim() != len(event) + 1 or x0.shape[1:] != event:
            raise ValueError(f"x0: expected shape (batch, {', '.join(map(str, event))}), got {tuple(x0.shape)}")
        if validate:
            check_finite("x0", x0)
        ced = model.predictor.cond_event_dims
        if cond is not None:
            if model.predictor.check_cond(cond) != x0.shape[:1]:
                raise ValueError(f"cond: expected batch shape {tuple(x0.shape[:1])} to match x0")
        n, device = x0.shape[0], x0.device
        process = MarkovInterpolant(event_dim=len(event))
        if len(self._steps) == 1:
            choice = torch.zeros(n, dtype=torch.long, device=device)
        else:
            choice = torch.randint(len(self._steps), (n,), device=device, generator=generator)
        groups = []
        for i, T in enumerate(self._steps):
            index = (choice == i).nonzero().squeeze(-1)
            m = index.numel()
            if m == 0:
                continue
            t0 = sample_t_min((m,), *self.t_min, generator=generator, device=device)
            grid = time_grid(T, t0, self.shift, device=device)  # (m, T+1)
            drop = guidance_dropout(m, self.cond_drop if cond is not None else 0.0, device, generator)
            dist = model.distribution(grid, index_cond(cond, ced, index), drop_cond=drop, validate_args=False)
            traj = process.sample(x0[index], grid, generator=generator)  # (m, T+1, *data)
            k = None
            if self.mode == "pair":
                k = torch.randint(1, T + 1, (m,), device=device, generator=generator)
            groups.append(TrajectoryGroup(index, T, dist, traj, k))
        return groups

    def group_nll(self, group: TrajectoryGroup) -> Tensor:
        """The NLL in nats/dim of each trajectory of a group, ``(m,)`` (see ``mode``)."""
        dims = group.dist.data_shape.numel()
        if self.mode == "trajectory":
            return -group.dist.log_prob(group.traj) / ((group.steps + 1) * dims)
        return -group.dist.pair_log_prob(group.traj, group.k) / dims

    def per_example(
        self,
        model,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> Tensor:
        """The NLL in nats/dim of each example of a flat batch ``x0`` of shape ``(B, *data)``; ``(B,)``."""
        out = torch.empty(x0.shape[0], device=x0.device)
        for group in self.draw(model, x0, cond, generator=generator, validate=validate):
            out[group.index] = self.group_nll(group)
        return out

    def __call__(
        self, model, x0: Tensor, cond: Condition | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        return self.per_example(model, x0, cond, generator=generator).mean()
