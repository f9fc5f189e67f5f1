"""The model and the training objective of every toy method (see :data:`~examples.toy.config.METHODS`)."""

from __future__ import annotations

import torch
import zuko
from torch import Tensor, nn

from examples.toy.config import DIMS, METHODS, ToyConfig
from trajflow.baselines.flow_matching import FlowMatchingLoss
from trajflow.losses import TrajectoryNLL
from trajflow.model import NTM
from trajflow.predictors import MLPPredictor
from trajflow.transporters import IdentityTransporter, ZukoTransporter
from trajflow.velocity import MLPVelocity

__all__ = ["build_model", "ToyObjective"]


def build_model(method: str, cfg: ToyConfig) -> nn.Module:
    """The untrained model of ``method`` (one of :data:`METHODS`), initialised from ``cfg.seed``.

    Example:
        >>> from trajflow.nn import count_parameters
        >>> model = build_model("fm", ToyConfig(width=16, depth=1))
        >>> type(model).__name__, count_parameters(model) > 0
        ('MLPVelocity', True)
    """
    _check_method(method)
    torch.manual_seed(cfg.seed)  # the same initial MLP weights whatever ran before
    if method in ("ntm", "gaussian"):
        if method == "ntm":
            transporter = ZukoTransporter(
                DIMS,
                transforms=cfg.transporter_transforms,
                hidden_features=(cfg.transporter_hidden,) * 2,
                bins=cfg.transporter_bins,
            )
        else:
            transporter = IdentityTransporter(DIMS)
        predictor = MLPPredictor(DIMS, width=cfg.width, depth=cfg.depth, time_features=cfg.time_features)
        return NTM(transporter, predictor)
    if method == "fm":
        return MLPVelocity(DIMS, width=cfg.width, depth=cfg.depth, time_features=cfg.time_features)
    return zuko.flows.NSF(
        DIMS, transforms=cfg.nsf_transforms, hidden_features=(cfg.width,) * cfg.depth, bins=cfg.nsf_bins
    )


class ToyObjective:
    """The :class:`~trajflow.train.Objective` of one toy method: ``objective(model, x0, generator, step)``.

    ``x0`` is a ``(batch, 2)`` batch of data points; the loss is a float32 scalar per dimension (nats/dim for
    the likelihoods: NTM's and the Gaussian-step model's trajectory NLL, the NSF's exact NLL; the flow-matching
    regression loss for ``fm``). Every random draw uses ``generator``; ``step`` is not used (no term follows
    a schedule).

    Example:
        >>> cfg = ToyConfig(width=16, depth=1)
        >>> objective = ToyObjective("nsf", cfg)
        >>> loss = objective(build_model("nsf", cfg), torch.randn(8, 2), torch.Generator(), 0)
        >>> objective.loss_name, loss.shape
        ('nll_per_dim', torch.Size([]))
    """

    def __init__(self, method: str, cfg: ToyConfig) -> None:
        _check_method(method)
        self.method = method
        self.loss_name = "fm_loss" if method == "fm" else "nll_per_dim"
        if method in ("ntm", "gaussian"):
            # t_min fixed (not drawn per example) so that training matches the ELBO's grid exactly.
            self._nll = TrajectoryNLL(steps=cfg.steps, t_min=(cfg.t_min, cfg.t_min), shift=cfg.shift, cond_drop=0.0)
        elif method == "fm":
            self._fm = FlowMatchingLoss(cond_drop=0.0)

    def __call__(self, model: nn.Module, x0: Tensor, generator: torch.Generator, step: int) -> Tensor:
        if self.method in ("ntm", "gaussian"):
            return self._nll(model, x0, generator=generator)
        if self.method == "fm":
            return self._fm(model, x0, generator=generator)
        return -model().log_prob(x0).mean() / DIMS  # nsf: exact NLL, no noise


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
