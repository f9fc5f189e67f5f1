r"""Trajectory score denoising and the learned one-pass denoiser ("self-distillation").

**Trajectory score denoising** (NTM Eq. 3.5, Algorithm 3, :mod:`~trajflow.denoise.score`). A generated
trajectory :math:`\hat x` is a noisy Markov sequence whose noise given :math:`x_0` is Gaussian with
covariance :math:`S \otimes I` (:meth:`trajflow.MarkovInterpolant.covariance`); Tweedie's formula for
correlated Gaussian noise gives

.. math:: \mathbb{E}[x_0 | \hat x] = \frac{\hat x_i + \sum_j S_{ij} \nabla_{\hat x_j} \log p(\hat x)}{1 - t_i}
          \quad \text{for every level } i < T,

and an NTM gives the exact score of the *whole trajectory* by autograd through its NLL. Under guidance the
score is that of the **conditional** model (as in STARFlow's code).

**Learned denoiser** (NTM §3.4, method.md 5.2). A network :math:`g_\phi(u_{t_0}, y) \to x_0`
(:mod:`~trajflow.denoise.networks`) regresses the score-denoised targets of the frozen NTM on real-data
trajectories (:class:`DistillationLoss`); :func:`fast_sample` then runs the predictor :math:`T` times and
:math:`g_\phi` once, skipping the transporter's inverse and the backward pass.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.2 (Eq. 3.5), §3.4, App. A.6, C.3, Algorithms 2-3.
    | https://arxiv.org/abs/2605.08078
"""

from .loss import DistillationLoss
from .networks import LearnedDenoiser, MLPDenoiser, MLPDenoiserConfig, TransformerDenoiser, load_denoiser, save_denoiser
from .sampling import fast_sample, sample_denoised
from .score import trajectory_score_denoise

__all__ = [
    "trajectory_score_denoise",
    "sample_denoised",
    "LearnedDenoiser",
    "MLPDenoiserConfig",
    "MLPDenoiser",
    "TransformerDenoiser",
    "DistillationLoss",
    "fast_sample",
    "save_denoiser",
    "load_denoiser",
]
