r"""Velocity models from diffusers: flow-matching ``UNet2DModel`` s and SD3 / FLUX transformers.

diffusers' flow-matching convention is trajflow's, with time measured in training timesteps. Its
``FlowMatchEulerDiscreteScheduler`` (diffusers 0.42) noises as ``sample = sigma * noise + (1.0 - sigma) * sample``
(:math:`x_\sigma = (1 - \sigma) x_0 + \sigma \epsilon`), calls the network at ``timesteps = sigmas *
num_train_timesteps`` and steps ``prev_sample = sample + (sigma_next - sigma) * model_output`` (its stochastic
branch: ``x0 = sample - sigma * model_output``), so the network predicts :math:`v = \epsilon - x_0`. An adapter
therefore calls it at ``timestep = num_train_timesteps * t`` (:math:`\sigma = t`; FLUX's transformers take
``timestep / 1000``) and returns its output as :math:`v` unchanged; diffusers' ``shift`` is
:func:`trajflow.time_grid`'s. The network must have been trained in this convention (a DDPM
:math:`\epsilon`-prediction UNet is not a velocity model).

The adapters, each a :class:`DiffusersVelocity` whose docstring gives its conversion: :class:`UNet2DVelocity`
(class labels), :class:`SD3Velocity`, :class:`FluxVelocity` and :class:`Flux2Velocity` (text);
:class:`UNet2DMeanFlow` is MeanFlow's average velocity on a :class:`UNet2DVelocity` (the few-step baseline).
Each adapter loads a local diffusers folder only (:meth:`~DiffusersVelocity.from_diffusers`,
``local_files_only=True``), writes one back (:meth:`~DiffusersVelocity.save_diffusers`) and saves with
:meth:`~trajflow.checkpoint.Pretrained.save_pretrained`, also as a part of an NTM built by
:func:`trajflow.finetune.init_from_flow_matching` (import this module before ``NTM.from_pretrained`` reads
such a folder: it registers the adapters' names). :class:`NTMDiffusersPipeline` goes from prompts to images
with the pipeline's own text encoders (:class:`DiffusersPromptEncoder`), NTM steps in latent space and its
VAE in float32 (:class:`PipelineVAE`), beside the FM baseline sampled by diffusers' scheduler
(:func:`scheduler_sample`). diffusers is imported only when an adapter is built (``pip install diffusers``);
:class:`UNet2DVelocity` and :class:`SD3Velocity` show examples.

References:
    | Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (Esser et al., 2024).
    | https://arxiv.org/abs/2403.03206
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3. https://arxiv.org/abs/2605.08078
    | diffusers. https://github.com/huggingface/diffusers
"""

from .base import DiffusersVelocity
from .flux import Flux2Velocity, FluxVelocity
from .loading import PIPELINE_ADAPTERS, DiffusersPromptEncoder, PromptEncoder, load_diffusers_pipeline
from .pipeline import NTMDiffusersPipeline
from .scheduler import scheduler_sample, set_pipeline_timesteps
from .text import SD3Velocity
from .unet import UNet2DMeanFlow, UNet2DVelocity
from .vae import PipelineVAE

__all__ = [
    "DiffusersVelocity",
    "UNet2DVelocity",
    "UNet2DMeanFlow",
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
