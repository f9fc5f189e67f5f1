r"""The Gaussian-step model: an NTM without a transporter, the "Gaussian bottleneck" NTM removes.

With the identity transporter every reverse step :math:`p(x_s \mid x_t)` of the trajectory is a diagonal
Gaussian :math:`\mathcal{N}(\mu_P, \sigma_P^2)` given by the predictor (NTM Appendix A.2): a few-step,
diffusion-like model whose exact trajectory likelihood is trained and evaluated exactly like an NTM's
(:class:`~trajflow.TrajectoryNLL`, :func:`~trajflow.likelihood.elbo_bits_per_dim`). Paired with the same
predictor it isolates what the transporter adds.

Example:
    >>> from trajflow.predictors import MLPPredictor
    >>> model = gaussian_step_model(MLPPredictor(features=2))
    >>> type(model.transporter).__name__, model.sample((3,), steps=2).shape
    ('IdentityTransporter', torch.Size([3, 2]))
"""

from __future__ import annotations

from ..model import NTM
from ..predictors.base import Predictor
from ..transporters import IdentityTransporter

__all__ = ["gaussian_step_model"]


def gaussian_step_model(predictor: Predictor) -> NTM:
    """``NTM(IdentityTransporter(predictor.event_shape), predictor)``: Gaussian reverse steps only.

    Arguments:
        predictor: The network of the reverse steps' means and scales (e.g. the NTM's own predictor
            architecture, for a comparison at equal backbone).
    """
    if not isinstance(predictor, Predictor):
        raise ValueError(f"predictor: expected a trajflow Predictor, got {type(predictor).__name__}")
    return NTM(IdentityTransporter(tuple(predictor.event_shape)), predictor)
