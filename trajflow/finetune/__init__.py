r"""Initialising an NTM from a pretrained flow-matching model, and the mean-alignment loss (NTM §3.3).

Recipe (method.md 3.4):

1. Wrap the velocity model in :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor`:
   :math:`\mu_P = A u_t + B (u_t - t v)`, :math:`\sigma_P = C e^{\delta_\sigma}`, :math:`\delta_\sigma`
   zero-initialised.
2. Use a transporter that is **exactly the identity at initialisation** (:func:`identity_transporter`: the
   zero-headed :class:`~trajflow.transporters.transformer.TransformerTransporter` for images, a zuko MAF
   with zeroed hyper-networks, :func:`zero_init_zuko_`, for vectors; :func:`check_identity` verifies it).
   Then every step of the NTM *is* the flow-matching model's Gaussian posterior sampler
   :math:`\mathcal{N}(A x_t + B (x_t - t v(x_t)), C^2)` (:func:`init_from_flow_matching` does steps 1-2).
3. Train with :class:`FinetuneLoss`: the trajectory NLL plus
   :math:`\lambda \sum_k \|\mu_P^{(k)} - \mu_{FM}^{(k)}\|^2` against a frozen copy of the velocity model
   reading data space, :math:`\lambda` = 2.5 decaying by a cosine to 0; a
   :class:`~trajflow.train.Trainer` objective as it stands.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3, Eqs. 3.6-3.8, App. A.3, A.5, Table 4-5.
    | https://arxiv.org/abs/2605.08078
"""

from .initialise import (
    FlowMatchingInit,
    check_identity,
    frozen_copy,
    identity_transporter,
    init_from_flow_matching,
    zero_init_zuko_,
)
from .objective import DEFAULT_DECAY_STEPS, FinetuneLoss, MeanAlignmentLoss

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
