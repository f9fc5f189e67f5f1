r"""Velocity models from diffusers: flow-matching ``UNet2DModel`` s and SD3 / FLUX transformers.

diffusers' flow-matching convention is trajflow's, with time measured in training timesteps. Its
``FlowMatchEulerDiscreteScheduler`` (diffusers 0.42, ``scheduling_flow_match_euler_discrete.py``) noises
with :math:`\sigma` as

* ``scale_noise``: ``sample = sigma * noise + (1.0 - sigma) * sample``, i.e.
  :math:`x_\sigma = (1 - \sigma) x_0 + \sigma \epsilon`;
* ``set_timesteps``: ``timesteps = sigmas * num_train_timesteps`` (the network sees :math:`1000 \sigma`);
* ``step``: ``prev_sample = sample + (sigma_next - sigma) * model_output``, an Euler step of
  :math:`dx / d\sigma = v`, and its stochastic branch ``x0 = sample - sigma * model_output``, so the network
  predicts :math:`v = \epsilon - x_0`.

So :math:`\sigma = t` and an adapter calls the network at ``timestep = num_train_timesteps * t`` and returns
its output as :math:`v` unchanged; diffusers' ``shift`` (``shift * s / (1 + (shift - 1) s)``) is also
:func:`trajflow.time_grid`'s. The wrapped network must have been trained in this convention (a DDPM
:math:`\epsilon`-prediction UNet is not a velocity model).

FLUX's transformers take :math:`\sigma` itself and multiply it by 1000 inside (their pipelines pass
``timestep / 1000``), so their adapters pass ``num_train_timesteps * t / 1000``.

The adapters: :class:`UNet2DVelocity` (``UNet2DModel``, class labels) and the text-conditional
:class:`SD3Velocity` (``SD3Transformer2DModel``), :class:`FluxVelocity` (``FluxTransformer2DModel``) and
:class:`Flux2Velocity` (``Flux2Transformer2DModel``); each docstring gives its conversion, checked against its
diffusers pipeline. Each is a :class:`DiffusersVelocity`: it loads a diffusers folder from disk only
(:meth:`~DiffusersVelocity.from_diffusers`, ``local_files_only=True``, nothing is fetched from a hub; a
folder of another class or without ``config.json`` is refused naming the file), writes one back
(:meth:`~DiffusersVelocity.save_diffusers`), and saves with trajflow's own
:meth:`~trajflow.checkpoint.Pretrained.save_pretrained` (the network's diffusers config in ``config.json``),
also as a part of an NTM built on it by :func:`trajflow.finetune.init_from_flow_matching` (import this module
before ``NTM.from_pretrained`` reads such a folder: it registers the adapters' names).

The sampler pipeline :class:`NTMDiffusersPipeline` goes from prompts to images with the pipeline's own pieces:
its text encoders (:class:`DiffusersPromptEncoder`), an NTM's steps in latent space with the clipped Gaussian
guidance, and its VAE in float32 (:class:`PipelineVAE`); beside it the FM baseline, the flow-matching model
sampled by diffusers' ``FlowMatchEulerDiscreteScheduler`` as its pipeline does (:func:`scheduler_sample`).
``examples/finetune_diffusers/`` fine-tunes such an NTM from a local checkpoint.

diffusers is imported only when an adapter is built (``pip install diffusers``).

Example:
    >>> from diffusers import UNet2DModel  # doctest: +SKIP
    >>> from trajflow.contrib.diffusers import UNet2DVelocity  # doctest: +SKIP
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    layers_per_block=1, norm_num_groups=4,
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
    ...                    up_block_types=("UpBlock2D", "UpBlock2D"))  # doctest: +SKIP
    >>> v, hidden = UNet2DVelocity(unet)(torch.randn(3, 1, 8, 8), torch.rand(3))  # doctest: +SKIP
    >>> v.shape, hidden.shape  # doctest: +SKIP
    (torch.Size([3, 1, 8, 8]), torch.Size([3, 64, 8]))

References:
    | Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (Esser et al., 2024).
    | https://arxiv.org/abs/2403.03206
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3. https://arxiv.org/abs/2605.08078
    | diffusers. https://github.com/huggingface/diffusers

The package: :mod:`~.base` (:class:`DiffusersVelocity`), :mod:`~.unet`, :mod:`~.text` (SD3 and what the
text-conditional transformers share), :mod:`~.flux`, :mod:`~.loading` (pipeline folders and the prompt
encoder), :mod:`~.vae`, :mod:`~.scheduler` (the FM baseline) and :mod:`~.pipeline`.
"""

from .base import DiffusersVelocity
from .flux import Flux2Velocity, FluxVelocity
from .loading import PIPELINE_ADAPTERS, DiffusersPromptEncoder, PromptEncoder, load_diffusers_pipeline
from .pipeline import NTMDiffusersPipeline
from .scheduler import scheduler_sample, set_pipeline_timesteps
from .text import SD3Velocity
from .unet import UNet2DVelocity
from .vae import PipelineVAE

__all__ = [
    "DiffusersVelocity",
    "UNet2DVelocity",
    "SD3Velocity",
    "FluxVelocity",
    "Flux2Velocity",
    "PIPELINE_ADAPTERS",
    "PromptEncoder",
    "load_diffusers_pipeline",
    "DiffusersPromptEncoder",
    "PipelineVAE",
    "set_pipeline_timesteps",
    "scheduler_sample",
    "NTMDiffusersPipeline",
]
