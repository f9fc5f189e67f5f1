r"""Trajectory score denoising and the learned one-pass denoiser ("self-distillation").

**Trajectory score denoising** (NTM Eq. 3.5, Algorithm 3). A generated trajectory
:math:`\hat x = (\hat x_{t_0}, \dots, \hat x_{t_T})` is a noisy Markov sequence whose noise given
:math:`x_0` is Gaussian with covariance :math:`S \otimes I` (:meth:`trajflow.MarkovInterpolant.covariance`).
Tweedie's formula for correlated Gaussian noise gives

.. math:: \mathbb{E}[x_0 | \hat x] = \frac{\hat x_i + \sum_j S_{ij} \nabla_{\hat x_j} \log p(\hat x)}{1 - t_i}
          \quad \text{for every level } i < T,

and an NTM gives :math:`\nabla \log p` of the *whole trajectory* exactly, by autograd through its NLL.
:func:`trajectory_score_denoise` returns the :math:`t_0` component. For the true density all levels give
the same answer, :math:`\mathbb{E}[x_0 | x_{t_0}]` (the chain is Markov), which the tests check on
Gaussian data.

**Learned denoiser** (NTM §3.4, method.md 5.2). A network :math:`g_\phi(u_{t_0}, y) \to x_0` regresses
the score-denoised targets of the frozen NTM on *real-data* trajectories (:class:`DistillationLoss`).
Sampling then skips the transporter's token-by-token inverse and the backward pass
(:func:`fast_sample`): the predictor runs :math:`T` times, then :math:`g_\phi` once.

Under classifier-free guidance the score is that of the **conditional** model (the guided chain is only
used to generate; STARFlow's code does the same), see :func:`trajectory_score_denoise`.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.2 (Eq. 3.5), §3.4, App. A.6, C.3, Algorithms 2-3.
    | https://arxiv.org/abs/2605.08078

The package, one module per concern: :mod:`~trajflow.denoise.score` (the algorithm),
:mod:`~trajflow.denoise.networks` (the learned denoisers), :mod:`~trajflow.denoise.loss` (self-distillation),
:mod:`~trajflow.denoise.sampling` (the two sampling paths) and :mod:`~trajflow.denoise.persistence`.
"""

from .loss import DistillationLoss
from .networks import LearnedDenoiser, MLPDenoiser, MLPDenoiserConfig, TransformerDenoiser
from .persistence import load_denoiser, save_denoiser
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
