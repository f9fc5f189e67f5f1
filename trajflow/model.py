r"""The Normalizing Trajectory Model: a shared transporter plus a deep predictor, which builds a
:class:`~trajflow.distribution.TrajectoryDistribution` for a time grid and a condition."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import Pretrained, build_part, check_config_keys, part_config
from .conditioning import Condition, CondSpec, cond_spec_of
from .distribution import TrajectoryDistribution, check_compatible
from .predictors.base import Predictor
from .process import SAMPLE_T_MIN, time_grid
from .transporters.base import Transporter

__all__ = ["NTM"]


class NTM(Pretrained, nn.Module):
    r"""A Normalizing Trajectory Model :math:`p(x_{t_0}, \dots, x_{t_T})`.

    Arguments:
        transporter: The invertible map :math:`f_T(x, t)` shared across levels.
        predictor: The network giving :math:`(\mu_P, \sigma_P)` of each reverse step.

    A model whose parts are library classes built from their configs (every transporter except
    :class:`~trajflow.transporters.NflowsTransporter` and a :class:`~trajflow.transporters.ZukoTransporter` of
    a user flow; every predictor except a :class:`~trajflow.predictors.FlowMatchingPredictor` of a
    :class:`~trajflow.velocity.CallableVelocity`) is saved with :meth:`save_pretrained` (``config.json`` and
    ``model.safetensors``; a part that cannot be saved raises a ``TypeError`` naming it) and rebuilt with
    :meth:`from_pretrained` (nothing is unpickled, no code from the folder runs).

    Example:
        >>> import tempfile, trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2, hidden_features=(8,)),
        ...                      trajflow.predictors.MLPPredictor(features=2, width=8, depth=1))
        >>> model.sample((16,), steps=4).shape
        torch.Size([16, 2])
        >>> folder = model.save_pretrained(tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
        >>> again = trajflow.NTM.from_pretrained(folder)
        >>> x, grid = torch.randn(3, 3, 2), trajflow.time_grid(2, 0.05)
        >>> torch.equal(again.distribution(grid).log_prob(x), model.distribution(grid).log_prob(x))
        True
    """

    def __init__(self, transporter: Transporter, predictor: Predictor) -> None:
        super().__init__()
        check_compatible(transporter, predictor)
        self.transporter = transporter
        self.predictor = predictor

    def config_dict(self) -> dict[str, Any]:
        """``{"transporter": ..., "predictor": ...}``, each part's ``{"class", "config"}``
        (:func:`~trajflow.checkpoint.part_config`); a part that cannot be rebuilt from a config gives a
        ``TypeError`` naming it."""
        return {
            "transporter": part_config(self.transporter, "transporter"),
            "predictor": part_config(self.predictor, "predictor"),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NTM:
        """An untrained NTM from :meth:`config_dict`'s output; a ``ValueError`` names a missing or unknown
        field, or a part whose record does not build (:func:`~trajflow.checkpoint.build_part`)."""
        check_config_keys(cls, config, known=("transporter", "predictor"))
        for key in ("transporter", "predictor"):
            if key not in config:
                raise ValueError(f"config: expected a {key!r} part, got fields {sorted(config)}")
        return cls(build_part(config["transporter"], "transporter"), build_part(config["predictor"], "predictor"))

    @property
    def cond_spec(self) -> CondSpec | None:
        """The condition the model takes: its predictor's (a conditional transporter takes the same kind; the
        distribution checks the condition against both)."""
        return cond_spec_of(self.predictor)

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
        temperature: float = 1.0,
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
            temperature=temperature,
            validate_args=validate_args,
        )

    @torch.no_grad()
    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = (),
        *,
        cond: Condition | None = None,
        steps: int = 4,
        t_min: float = SAMPLE_T_MIN,
        shift: float = 1.0,
        grid: Tensor | None = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Generate :math:`x_{t_0}` (or whole trajectories) in ``steps`` predictor steps.

        Arguments:
            sample_shape: Samples per condition, on the left of the condition's batch shape.
            cond: The condition, or ``None``.
            steps, t_min, shift: The grid (see :func:`trajflow.time_grid`), unless ``grid`` is given. The
                default ``t_min`` is :data:`~trajflow.process.SAMPLE_T_MIN` (0.02, NTM's sampling level, inside
                the training range): the sample is then :math:`x_{0.02}`, slightly noised data that
                :func:`~trajflow.denoise.sample_denoised` can clean. ``t_min=0`` gives
                :math:`x_0`: the edge of the default training range, and a level a model trained with
                :math:`t_{\min} > 0` never saw.
            guidance: Classifier-free guidance weight.
            temperature: Every step's scale times this (> 0; below 1: each step closer to its mean); see
                :class:`TrajectoryDistribution`.
            return_trajectory: Return ``(*sample, *batch, T + 1, *data)`` instead of the cleanest level.
            generator: The :class:`torch.Generator` (on the model's device) that draws all the noise: the
                same seed gives the same samples and the global generator is left untouched.
        """
        if grid is None:
            grid = time_grid(steps, t_min, shift, device=self.device)
        dist = self.distribution(grid, cond, guidance=guidance, temperature=temperature)
        traj = dist.sample(sample_shape, generator=generator)
        if return_trajectory:
            return traj
        return traj.select(traj.dim() - len(self.event_shape) - 1, 0)
