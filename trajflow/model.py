r"""The Normalizing Trajectory Model: a shared transporter plus a deep predictor.

``NTM`` owns the two networks and builds a :class:`~trajflow.distribution.TrajectoryDistribution` for a
time grid and a condition. Training losses live in :mod:`trajflow.losses`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conditioning import Condition
from .distribution import TrajectoryDistribution, check_compatible
from .predictors.base import Predictor
from .process import time_grid
from .transporters.base import Transporter

__all__ = ["NTM"]


class NTM(nn.Module):
    r"""A Normalizing Trajectory Model :math:`p(x_{t_0}, \dots, x_{t_T})`.

    Arguments:
        transporter: The invertible map :math:`f_T(x, t)` shared across levels.
        predictor: The network giving :math:`(\mu_P, \sigma_P)` of each reverse step.

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> model.sample((16,), steps=4).shape
        torch.Size([16, 2])
    """

    def __init__(self, transporter: Transporter, predictor: Predictor) -> None:
        super().__init__()
        check_compatible(transporter, predictor)
        self.transporter = transporter
        self.predictor = predictor

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size(self.transporter.event_shape)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def distribution(
        self,
        grid: Tensor,
        cond: Condition | None = None,
        *,
        guidance: float = 0.0,
        drop_cond: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> TrajectoryDistribution:
        """The trajectory distribution on ``grid`` given ``cond``; see :class:`TrajectoryDistribution`."""
        return TrajectoryDistribution(
            self.transporter,
            self.predictor,
            grid,
            cond,
            guidance=guidance,
            drop_cond=drop_cond,
            validate_args=validate_args,
        )

    @torch.no_grad()
    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = (),
        *,
        cond: Condition | None = None,
        steps: int = 4,
        t_min: float = 0.0,
        shift: float = 1.0,
        grid: Tensor | None = None,
        guidance: float = 0.0,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Generate :math:`x_{t_0}` (or whole trajectories) in ``steps`` predictor steps.

        Arguments:
            sample_shape: Samples per condition, on the left of the condition's batch shape.
            cond: The condition, or ``None``.
            steps, t_min, shift: The grid (see :func:`trajflow.time_grid`), unless ``grid`` is given.
            guidance: Classifier-free guidance weight.
            return_trajectory: Return ``(*sample, *batch, T + 1, *data)`` instead of the cleanest level.
            generator: The :class:`torch.Generator` (on the model's device) that draws all the noise: the
                same seed gives the same samples and the global generator is left untouched.
        """
        if grid is None:
            grid = time_grid(steps, t_min, shift, device=self.device)
        traj = self.distribution(grid, cond, guidance=guidance).sample(sample_shape, generator=generator)
        if return_trajectory:
            return traj
        return traj.select(traj.dim() - len(self.event_shape) - 1, 0)
