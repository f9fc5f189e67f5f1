"""The FM baseline: the flow-matching model sampled by diffusers' ``FlowMatchEulerDiscreteScheduler`` as its
pipeline does."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...checks import check_number
from ...conditioning import Condition, cat_cond
from ...nn.patches import check_images
from .base import _diffusers_class
from .loading import PIPELINE_ADAPTERS

__all__ = ["set_pipeline_timesteps", "scheduler_sample"]


def set_pipeline_timesteps(
    scheduler: Any,
    steps: int,
    *,
    pipeline: str | None = None,
    image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    r"""Set ``scheduler``'s timesteps as the diffusers pipeline ``pipeline`` sets them; returns them.

    ``StableDiffusion3Pipeline`` (and ``None``): the scheduler's own spacing, with ``mu = calculate_shift(
    image_seq_len, ...)`` when its config has ``use_dynamic_shifting``. ``FluxPipeline``: sigmas ``linspace(1,
    1 / steps, steps)`` (none with ``use_flow_sigmas``) and ``mu = calculate_shift(...)``; ``Flux2KleinPipeline``
    / ``Flux2Pipeline``: the same sigmas and ``mu = compute_empirical_mu(image_seq_len, steps)`` (diffusers' own
    functions). ``sigmas`` overrides the spacing, as the pipelines' ``sigmas=``; ``image_seq_len`` is the number
    of image tokens the transformer sees (SD3: ``(H / p) (W / p)``; FLUX.1: ``H W / 4``; FLUX.2: ``H' W'``).
    """
    steps = _checked_schedule(scheduler, int(steps), pipeline)
    # retrieve_timesteps(scheduler, steps, device, sigmas=..., mu=...)
    mu = _shift_mu(scheduler.config, pipeline, image_seq_len, steps)
    scheduler.set_timesteps(device=device, **_spacing(scheduler.config, pipeline, steps, sigmas), **mu)
    return scheduler.timesteps


def _checked_schedule(scheduler: Any, steps: int, pipeline: str | None) -> int:
    if steps < 1:
        raise ValueError(f"steps: expected a positive number of steps, got {steps}")
    if pipeline is not None and pipeline not in PIPELINE_ADAPTERS:
        raise ValueError(f"pipeline: expected None or one of {sorted(PIPELINE_ADAPTERS)}, got {pipeline!r}")
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ValueError(
            "scheduler: invert_sigmas schedulers (Mochi) are not flow-matching samplers of this convention"
        )
    return steps


def _spacing(config: Any, pipeline: str | None, steps: int, sigmas: Sequence[float] | None) -> dict[str, Any]:
    """``set_timesteps``' spacing: ``sigmas``, else FLUX's ``linspace(1, 1 / steps, steps)``, else the scheduler's."""
    if sigmas is None and (pipeline or "").startswith("Flux") and not getattr(config, "use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / steps, steps)
    return {"num_inference_steps": steps} if sigmas is None else {"sigmas": list(sigmas)}


def _shift_mu(config: Any, pipeline: str | None, image_seq_len: int, steps: int) -> dict[str, Any]:
    """``{"mu": ...}``, the resolution-dependent shift the pipeline passes to ``set_timesteps``, or ``{}``."""
    if pipeline in ("Flux2KleinPipeline", "Flux2Pipeline"):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return {"mu": compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)}
    if pipeline == "FluxPipeline" or config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return {
            "mu": calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        }
    return {}


def _image_tokens(velocity: nn.Module) -> int:
    """The number of image tokens the network sees (its ``image_seq_len``): patches of an image, else the length."""
    event_shape = torch.Size(velocity.event_shape)
    patch = int(getattr(velocity, "patch_size", 1) or 1)
    return event_shape[-2] * event_shape[-1] // patch**2 if len(event_shape) == 3 else event_shape[0]


@torch.no_grad()
def scheduler_sample(
    velocity: nn.Module,
    noise: Tensor,
    steps: int,
    *,
    cond: Condition | None = None,
    negative_cond: Condition | None = None,
    guidance_scale: float = 1.0,
    scheduler: Any = None,
    pipeline: str | None = None,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    r"""Flow-matching sampling through diffusers' ``FlowMatchEulerDiscreteScheduler``: "FM at ``steps`` steps".

    The loop of the diffusers pipeline ``pipeline`` (:func:`set_pipeline_timesteps`), calling the network
    through its adapter at :math:`t = \sigma` (the adapter's ``1000 t`` is the scheduler's ``sigmas * 1000``,
    the same float32 product) and handing its output to ``scheduler.step`` unchanged, in float32. Guidance is
    diffusers': with ``guidance_scale > 1``, ``v = v_u + guidance_scale (v_c - v_u)`` from one batched call on
    ``[negative, positive]``, ``v_u`` reading ``negative_cond`` or else the adapter's null condition (trajflow's
    weight ``w`` of :func:`~trajflow.baselines.flow_matching.euler_sample` is ``guidance_scale - 1``).

    Arguments:
        velocity: The adapter (:class:`SD3Velocity`, ...), or any trajflow velocity model.
        noise: The initial latents :math:`x_1` ``(N, *event_shape)`` in the adapter's layout.
        steps: The number of scheduler steps (network calls without guidance).
        cond: The condition ``(N, ...)``, or None.
        negative_cond: The negative condition ``(N, ...)`` of guidance, or None (the adapter's null).
        guidance_scale: diffusers' guidance scale (1: no guidance).
        scheduler: A ``FlowMatchEulerDiscreteScheduler`` (copied, not changed), by default one with diffusers'
            defaults (``shift=1``, 1000 training timesteps).
        pipeline: Whose timestep rule to follow (see :func:`set_pipeline_timesteps`).
        sigmas: Explicit sigmas (descending from 1, without the final 0), overriding the rule.

    Returns:
        The latents :math:`x_0` ``(N, *event_shape)``.
    """
    scheduler = (
        copy.deepcopy(scheduler) if scheduler is not None else _diffusers_class("FlowMatchEulerDiscreteScheduler")()
    )
    check_images("noise", noise, torch.Size(velocity.event_shape), flat=True)
    guidance_scale = check_number("guidance_scale", guidance_scale)
    n = noise.shape[0]
    timesteps = set_pipeline_timesteps(
        scheduler, steps, pipeline=pipeline, image_seq_len=_image_tokens(velocity), sigmas=sigmas, device=noise.device
    )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    v_of = _velocity_fn(velocity, cond, negative_cond, guidance_scale, noise)
    x = noise.float()
    for i, timestep in enumerate(timesteps):
        t = scheduler.sigmas[i].to(noise.device, torch.float32).expand(n)
        x = scheduler.step(v_of(x, t), timestep, x, return_dict=False)[0]
    return x


def _velocity_fn(
    velocity: nn.Module, cond: Condition | None, negative_cond: Condition | None, scale: float, noise: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """``v(x, t)``, diffusers' guided velocity ``v_u + scale (v_c - v_u)`` when it guides (``scale > 1`` and a
    ``cond``), from one call on ``[negative, positive]``: without a ``negative_cond``, the negative half is
    ``cond`` dropped to the adapter's null condition."""
    if scale <= 1 or cond is None:  # diffusers' do_classifier_free_guidance
        return lambda x, t: velocity(x, t, cond)[0]
    if negative_cond is None:
        n = noise.shape[0]
        both, drop = cat_cond(cond, cond), torch.arange(2 * n, device=noise.device) < n
    else:
        both, drop = cat_cond(negative_cond, cond), None

    def v_of(x: Tensor, t: Tensor) -> Tensor:
        v_u, v_c = velocity(torch.cat([x, x]), torch.cat([t, t]), both, drop)[0].chunk(2)
        return v_u + scale * (v_c - v_u)

    return v_of
