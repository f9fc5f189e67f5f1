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

The package: :mod:`~trajflow.finetune.identity` (step 2), :mod:`~trajflow.finetune.initialise` (steps 1-2) and
:mod:`~trajflow.finetune.objective` (step 3).

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3, Eqs. 3.6-3.8, App. A.3, A.5, Table 4-5.
    | https://arxiv.org/abs/2605.08078
"""

from .identity import check_identity, identity_transporter, zero_init_zuko_
from .initialise import FlowMatchingInit, frozen_copy, init_from_flow_matching
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
