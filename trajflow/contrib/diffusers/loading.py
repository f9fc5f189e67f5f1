"""Local diffusers pipeline folders: which adapter each pipeline takes, loading one, and its prompt encoder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checks import check_count
from ...conditioning import Condition
from .base import _diffusers_class, _local_json
from .flux import Flux2Velocity, FluxVelocity
from .text import SD3Velocity, _TextTransformerVelocity

__all__ = ["PIPELINE_ADAPTERS", "PromptEncoder", "load_diffusers_pipeline", "DiffusersPromptEncoder"]


#: The diffusers pipelines whose conventions :class:`NTMDiffusersPipeline` reproduces, and the adapter of each.
PIPELINE_ADAPTERS: dict[str, type[_TextTransformerVelocity]] = {
    "StableDiffusion3Pipeline": SD3Velocity,
    "FluxPipeline": FluxVelocity,
    "Flux2KleinPipeline": Flux2Velocity,
    "Flux2Pipeline": Flux2Velocity,
}

#: What turns prompts into the condition an adapter takes: ``encode_prompt(list_of_prompts) -> cond`` with
#: ``cond`` ``(prompt_embeds (N, L, D), pooled_embeds (N, P))`` (SD3, FLUX.1) or ``prompt_embeds (N, L, D)``
#: (FLUX.2). :class:`DiffusersPromptEncoder` is the diffusers pipeline's own; any callable of this form works
#: (e.g. one returning embeddings computed beforehand).
PromptEncoder = Callable[[list[str]], Condition]


def _pipeline_folder(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The local pipeline folder and its ``model_index.json``; a ValueError naming the path or file otherwise."""
    folder = Path(path).expanduser()
    what = "diffusers pipeline folder (model_index.json, text encoders, vae, scheduler, transformer)"
    hint = " (a folder holding one model takes the adapters' from_diffusers instead)"
    return folder, _local_json(folder, "model_index.json", what, hint)


def load_diffusers_pipeline(
    path: str | os.PathLike,
    *,
    transformer: nn.Module | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """A diffusers pipeline read from the **local** folder ``path`` (``local_files_only=True``), for its text
    encoders, tokenizers, VAE and scheduler: its transformer is not loaded unless passed (``transformer=``; SD3
    without T5 needs it, its ``encode_prompt`` reads the transformer's config).

    Arguments:
        path: A folder written by a diffusers pipeline's ``save_pretrained`` (``model_index.json`` and one
            subfolder per component).
        transformer: The pipeline's transformer to put in, or None (not loaded).
        torch_dtype: The dtype of the loaded components, as diffusers' ``from_pretrained``.
        device: Where the components go.
    """
    folder, record = _pipeline_folder(path)
    pipeline_class = _diffusers_class("DiffusionPipeline")
    kwargs: dict[str, Any] = {"transformer": transformer} if "transformer" in record else {}
    if torch_dtype is not None:  # diffusers >= 0.36 names it dtype (torch_dtype is deprecated there)
        from diffusers.utils import deprecation_utils

        kwargs["dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"] = torch_dtype
    pipe = pipeline_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


class DiffusersPromptEncoder:
    r"""Prompts -> the adapter's condition through the diffusers pipeline's own ``encode_prompt``.

    Called as the pipeline's ``__call__`` does for one image per prompt and no guidance (the null condition is
    encoded as its own prompt): SD3 (CLIP-L, CLIP-G and T5) and FLUX.1 (CLIP and T5) give ``(prompt_embeds,
    pooled_prompt_embeds)``, FLUX.2 (Qwen3 / Mistral) ``prompt_embeds``. The text encoders run in their own
    dtype with autocast off; the embeddings come back in that dtype, without gradients.

    Arguments:
        pipe: A diffusers pipeline of one of the classes of :data:`PIPELINE_ADAPTERS` (see
            :func:`load_diffusers_pipeline`).
        max_sequence_length: The T5 / Qwen / Mistral token count, or None for the pipeline's default (SD3 256,
            FLUX 512); prompts are padded to it, so every condition has the same length.
        device: Where the embeddings are computed, by default the pipeline's execution device.

    Example:
        >>> encode = DiffusersPromptEncoder(load_diffusers_pipeline("/models/sd3"))  # doctest: +SKIP
        >>> prompt_embeds, pooled = encode(["a photo of a cat"])  # doctest: +SKIP
    """

    def __init__(
        self, pipe: Any, *, max_sequence_length: int | None = None, device: str | torch.device | None = None
    ) -> None:
        name = type(pipe).__name__
        if name not in PIPELINE_ADAPTERS:
            raise ValueError(
                f"pipe: expected one of the diffusers pipelines {sorted(PIPELINE_ADAPTERS)}, got {name} (pass your own "
                "encode_prompt callable for another one)"
            )
        self.pipe = pipe
        self.pipeline = name
        self.max_sequence_length = (
            None if max_sequence_length is None else check_count("max_sequence_length", max_sequence_length)
        )
        self.device = None if device is None else torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str]) -> Condition:
        prompts = _prompt_list(prompts)
        device = self.device or self.pipe._execution_device
        kwargs: dict[str, Any] = {"prompt": prompts, "device": device}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            return _ENCODE[self.pipeline](self.pipe, kwargs)


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    return prompts


def _encode_sd3(pipe: Any, kwargs: dict[str, Any]) -> Condition:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, **kwargs)
    return embeds, pooled


def _encode_flux(pipe: Any, kwargs: dict[str, Any]) -> Condition:
    embeds, pooled, _ = pipe.encode_prompt(prompt_2=None, **kwargs)
    return embeds, pooled


def _encode_flux2(pipe: Any, kwargs: dict[str, Any]) -> Condition:
    return pipe.encode_prompt(**kwargs)[0]  # FLUX.2: no pooled embedding


# Each pipeline's encode_prompt, called as its __call__ does for one image per prompt and no guidance.
_ENCODE: dict[str, Callable[[Any, dict[str, Any]], Condition]] = {
    "StableDiffusion3Pipeline": _encode_sd3,
    "FluxPipeline": _encode_flux,
    "Flux2KleinPipeline": _encode_flux2,
    "Flux2Pipeline": _encode_flux2,
}
