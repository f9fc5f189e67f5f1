"""The sampler pipeline: prompts -> the pipeline's text encoders -> NTM steps (or diffusers' scheduler) -> VAE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ...checks import check_count
from ...conditioning import Condition
from ...denoise import sample_denoised
from ...model import NTM
from ...process import SAMPLE_T_MIN, time_grid
from .loading import PIPELINE_ADAPTERS, DiffusersPromptEncoder, PromptEncoder, _pipeline_folder, load_diffusers_pipeline
from .scheduler import scheduler_sample
from .vae import PipelineVAE

__all__ = ["NTMDiffusersPipeline"]


def _backbone_dtype(module: nn.Module | None) -> torch.dtype | None:
    for p in module.parameters() if module is not None else ():
        if p.is_floating_point():
            return p.dtype
    return None


def _placed(cond: Condition, device: torch.device, k: int) -> Condition:
    """``cond`` on ``device``, each row repeated ``k`` times (adjacent, as diffusers' ``num_images_per_prompt``)."""
    parts = [c.to(device).repeat_interleave(k, dim=0) for c in (cond if isinstance(cond, tuple) else (cond,))]
    return tuple(parts) if isinstance(cond, tuple) else parts[0]


def _rows(cond: Condition) -> int:
    return int((cond[0] if isinstance(cond, tuple) else cond).shape[0])


# (argument, is it wrong, what is expected) of model, encode_prompt, pipeline and autocast_dtype.
_ARGUMENT_CHECKS = (
    ("model", lambda v: v is not None and not hasattr(v, "sample"), "a trajflow NTM"),
    ("encode_prompt", lambda v: v is not None and not callable(v), "a callable prompts -> condition"),
    ("pipeline", lambda v: v not in (None, *PIPELINE_ADAPTERS), f"None or one of {sorted(PIPELINE_ADAPTERS)}"),
    (
        "autocast_dtype",
        lambda v: v not in ("auto", None, torch.bfloat16, torch.float16),
        "'auto', None, torch.bfloat16 or torch.float16",
    ),
)


def _check_arguments(model: object, velocity: object, *options: object) -> None:
    """The checks of :class:`NTMDiffusersPipeline`'s arguments that need nothing built."""
    if model is None and velocity is None:
        raise ValueError("model, velocity: expected an NTM, a flow-matching velocity model or both, got neither")
    for (name, wrong, expected), value in zip(_ARGUMENT_CHECKS, (model, *options), strict=True):
        if wrong(value):
            got = repr(value) if isinstance(value, (str, torch.dtype)) else type(value).__name__
            raise ValueError(f"{name}: expected {expected}, got {got}")


def _latent_shape(model: nn.Module | None, velocity: nn.Module | None, vae: PipelineVAE) -> torch.Size:
    """The one latent shape of the NTM and the FM baseline, checked against the VAE's latents."""
    shapes = {tuple(m.event_shape) for m in (model, velocity) if m is not None}
    if len(shapes) != 1:
        raise ValueError(f"model, velocity: expected one latent shape, got {sorted(shapes)}")
    shape = torch.Size(shapes.pop())
    if len(shape) != 3 or shape[0] != vae.channels:
        raise ValueError(
            f"vae: the model's latents {tuple(shape)} do not fit the VAE's {vae.channels} latent channels "
            f"({vae.layout} layout)"
        )
    return shape


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _load_ntm(path: str | os.PathLike, torch_dtype: torch.dtype | None) -> nn.Module:
    """The NTM saved in ``path``, its diffusers network cast to ``torch_dtype`` (its own parts stay float32)."""
    model = NTM.from_pretrained(path).eval()  # on the CPU: cast before it reaches the device
    backbone = getattr(getattr(model.predictor, "velocity", None), "model", None)
    if torch_dtype is not None and backbone is not None and _backbone_dtype(backbone) != torch_dtype:
        backbone.to(torch_dtype)
    return model


class NTMDiffusersPipeline:
    r"""Text to image with an NTM in a diffusers model's latent space, and the FM baseline as diffusers runs it.

    ``pipe(prompts)``: prompts -> the pipeline's own text encoders -> ``steps`` NTM steps in latent space with
    the clipped Gaussian guidance (:func:`trajflow.guidance.guided_gaussian`, weight ``guidance``, the adapter's
    null condition) -> the VAE decoder in float32 (:class:`PipelineVAE`). ``pipe.flow_matching(prompts,
    steps=N)``: the flow-matching model ``velocity`` sampled by diffusers' ``FlowMatchEulerDiscreteScheduler``
    as its pipeline does (:func:`scheduler_sample`: its timesteps, shift and CFG with the ``negative_prompt``).

    Both draw their initial latents :math:`x_1` first from ``generator`` (:meth:`prepare_latents`), so one seed
    gives both the same start; the NTM then draws one Gaussian per step from it. With ``autocast_dtype="auto"``
    the NTM samples under autocast in the backbone's dtype when that is bfloat16 or float16; the latents, the
    VAE and the images are float32 throughout, and the FM baseline runs without autocast, as diffusers does.

    Arguments:
        model: The NTM (:func:`trajflow.finetune.init_from_flow_matching` on an adapter, or one saved by
            ``examples/finetune_diffusers/train.py``), or None for the FM baseline alone.
        vae: A :class:`PipelineVAE`, or the pipeline's diffusers VAE (wrapped here).
        encode_prompt: ``encode_prompt(list_of_prompts) -> cond`` (:data:`PromptEncoder`, e.g.
            :class:`DiffusersPromptEncoder`), or None: then pass conditions (``cond=``) instead of prompts.
        velocity: The flow-matching adapter of the FM baseline (the pretrained model, e.g.
            ``SD3Velocity.from_diffusers(path, subfolder="transformer")``), or None.
        scheduler: The pipeline's ``FlowMatchEulerDiscreteScheduler`` (its ``shift`` and dynamic shifting are
            the pipeline's), or None for diffusers' defaults.
        pipeline: The diffusers pipeline class name whose timestep rule the FM baseline follows
            (:data:`PIPELINE_ADAPTERS`), or None (SD3's rule).
        negative_prompt: The FM baseline's negative prompt (diffusers' default ``""``).
        autocast_dtype: ``"auto"``, a dtype, or None (no autocast) for the NTM's sampling.

    Example:
        >>> pipe = NTMDiffusersPipeline.from_local("/models/sd3-medium", "runs/sd3/model",
        ...                                        torch_dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> g = torch.Generator("cuda").manual_seed(0)  # doctest: +SKIP
        >>> images = pipe(["a photo of a cat"], steps=4, guidance=1.0, generator=g)  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([1, 3, 512, 512]), torch.float32)
    """

    def __init__(
        self,
        model: nn.Module | None,
        vae: PipelineVAE | nn.Module,
        encode_prompt: PromptEncoder | None = None,
        *,
        velocity: nn.Module | None = None,
        scheduler: Any = None,
        pipeline: str | None = None,
        negative_prompt: str = "",
        autocast_dtype: torch.dtype | str | None = "auto",
    ) -> None:
        _check_arguments(model, velocity, encode_prompt, pipeline, autocast_dtype)
        self.model = model
        self.velocity = velocity
        self.vae = vae if isinstance(vae, PipelineVAE) else PipelineVAE(vae)
        self.encode_prompt = encode_prompt
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.negative_prompt = negative_prompt
        self.autocast_dtype = autocast_dtype
        self.event_shape = _latent_shape(model, velocity, self.vae)

    # -- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_local(
        cls,
        path: str | os.PathLike,
        model: nn.Module | str | os.PathLike | None = None,
        *,
        teacher: bool | None = None,
        resolution: int | tuple[int, int] | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        negative_prompt: str = "",
        autocast_dtype: torch.dtype | str | None = "auto",
    ) -> NTMDiffusersPipeline:
        """The pipeline of the **local** diffusers pipeline folder ``path`` (nothing is downloaded).

        Reads its text encoders, VAE and scheduler (:func:`load_diffusers_pipeline`; ``model_index.json`` names
        one of :data:`PIPELINE_ADAPTERS`) and the NTM ``model`` (or a folder written by its ``save_pretrained``,
        whose diffusers network is then cast to ``torch_dtype``; its own parts and the VAE stay float32). With
        ``teacher`` (default: without ``model``) it also loads the transformer through its adapter as the FM
        baseline's ``velocity``, with the encoded ``negative_prompt`` as its null condition and the latents of
        ``resolution`` px (default: the config's ``sample_size``, SD3 only).
        """
        folder, record = _pipeline_folder(path)
        name = record.get("_class_name")
        if name not in PIPELINE_ADAPTERS:
            raise ValueError(
                f"path: {str(folder / 'model_index.json')!r} describes a diffusers {name}, expected one of "
                f"{sorted(PIPELINE_ADAPTERS)}"
            )
        device = torch.device(device)
        pipe = load_diffusers_pipeline(folder, torch_dtype=torch_dtype, device=device)
        encoder = DiffusersPromptEncoder(pipe, max_sequence_length=max_sequence_length, device=device)
        vae = PipelineVAE(pipe.vae).to(device)
        if isinstance(model, (str, os.PathLike)):
            model = _load_ntm(model, torch_dtype).to(device)
        velocity = None
        if teacher if teacher is not None else model is None:
            size = None if resolution is None else list(vae.latent_shape(*_pair(resolution))[1:])
            velocity = PIPELINE_ADAPTERS[name].from_diffusers(
                folder,
                subfolder="transformer",
                torch_dtype=torch_dtype,
                sample_size=size,
                null_cond=encoder([negative_prompt]),
            )
            velocity = velocity.to(device).eval()
        return cls(
            model,
            vae,
            encoder,
            velocity=velocity,
            scheduler=pipe.scheduler,
            pipeline=name,
            negative_prompt=negative_prompt,
            autocast_dtype=autocast_dtype,
        )

    # -- the pieces ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        for module in (self.model, self.velocity):
            for p in module.parameters() if module is not None else ():
                return p.device
        return torch.device("cpu")

    def prepare_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The initial latents :math:`x_1` of ``n`` images: ``randn((n, *event_shape))`` float32, by ``generator``."""
        return torch.randn((n, *self.event_shape), generator=generator, device=self.device, dtype=torch.float32)

    def encode(self, prompts: str | Sequence[str], num_images_per_prompt: int = 1) -> Condition:
        """The condition of ``prompts``, each repeated ``num_images_per_prompt`` times (adjacent, as diffusers)."""
        if self.encode_prompt is None:
            raise ValueError("prompts: this pipeline has no encode_prompt; pass cond=... (the embeddings) instead")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return _placed(self.encode_prompt(prompts), self.device, num_images_per_prompt)

    def _condition(
        self, prompts: str | Sequence[str] | None, cond: Condition | None, num_images_per_prompt: int, output_type: str
    ) -> Condition:
        """The condition of a call (of ``prompts`` or ``cond``, repeated), after checking the call's options."""
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type: expected 'pt', 'pil' or 'latent', got {output_type!r}")
        check_count("num_images_per_prompt", num_images_per_prompt)
        if (prompts is None) == (cond is None):
            raise ValueError("prompts, cond: expected exactly one of them (prompt strings or their embeddings)")
        if prompts is not None:
            return self.encode(prompts, num_images_per_prompt)
        return _placed(cond, self.device, num_images_per_prompt)

    def _negative(self, from_prompt: bool, cond: Condition | None, n: int, k: int) -> Condition | None:
        """The FM baseline's negative condition: ``n`` rows of the encoded ``negative_prompt`` (diffusers' with
        prompts and guidance), else ``cond``'s rows repeated ``k`` times."""
        if from_prompt:
            return self.encode([self.negative_prompt] * n)
        return None if cond is None else _placed(cond, self.device, k)

    def _output(self, latents: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        images = self.vae.to_unit(self.vae.decode(latents))
        if output_type == "pt":
            return images
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    def _autocast(self) -> Any:
        dtype = self.autocast_dtype
        if dtype == "auto":
            backbone = getattr(getattr(self.model, "predictor", None), "velocity", None)
            dtype = _backbone_dtype(backbone)
            dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    # -- sampling ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        cond: Condition | None = None,
        steps: int = 4,
        guidance: float = 0.0,
        t_min: float | None = None,
        shift: float = 1.0,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        denoise: bool = False,
        output_type: str = "pt",
    ) -> Any:
        r"""NTM samples of ``prompts`` (or of the embeddings ``cond``), decoded.

        Arguments:
            prompts: A prompt or a list of them.
            cond: The condition instead of prompts (``(prompt_embeds, pooled)`` or ``prompt_embeds``).
            steps, t_min, shift: The NTM's time grid (:meth:`trajflow.NTM.sample`; ``t_min`` default 0.02, the
                sampling level inside the training range).
            guidance: The clipped Gaussian guidance weight :math:`w` (0: none).
            generator: Draws all the noise (on the pipeline's device).
            num_images_per_prompt: Images per prompt, adjacent in the output.
            denoise: Clean :math:`x_{t_{\min}}` with the trajectory's score (NTM Algorithm 3,
                :func:`trajflow.denoise.sample_denoised`; backpropagates through the model once).
            output_type: ``"pt"`` (float32 ``(N, 3, H, W)`` in [0, 1]), ``"pil"`` (a list of PIL images) or
                ``"latent"`` (the float32 latents, undecoded).
        """
        if self.model is None:
            raise ValueError("model: this pipeline holds no NTM (use flow_matching, or pass model=...)")
        cond = self._condition(prompts, cond, num_images_per_prompt, output_type)
        grid = time_grid(steps, SAMPLE_T_MIN if t_min is None else t_min, shift, device=self.device)
        with self._autocast():
            if denoise:
                with torch.enable_grad():
                    latents = sample_denoised(
                        self.model.distribution(grid, cond, guidance=guidance), generator=generator
                    )
                latents = latents.detach()
            else:
                latents = self.model.sample(cond=cond, grid=grid, guidance=guidance, generator=generator)
        return self._output(latents.float(), output_type)

    @torch.no_grad()
    def flow_matching(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        cond: Condition | None = None,
        negative_cond: Condition | None = None,
        steps: int = 28,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pt",
    ) -> Any:
        r"""The FM baseline: ``velocity`` sampled by diffusers' scheduler as its pipeline does, decoded.

        Arguments:
            prompts, cond, num_images_per_prompt, output_type: As :meth:`__call__`.
            negative_cond: The negative condition (with ``cond``); with prompts it is the encoded
                ``negative_prompt``.
            steps: Scheduler steps ("FM at ``steps`` steps").
            guidance_scale: diffusers' guidance scale (1: none; trajflow's :math:`w` is ``guidance_scale - 1``).
            generator: Draws the initial latents (:meth:`prepare_latents`), unless ``latents`` are given.
            latents: The initial latents :math:`x_1` ``(N, *event_shape)``.
            sigmas: Explicit sigmas instead of the pipeline's rule (see :func:`scheduler_sample`).
        """
        if self.velocity is None:
            raise ValueError(
                "velocity: this pipeline holds no flow-matching model (pass velocity=..., or teacher=True)"
            )
        use_negative = prompts is not None and guidance_scale > 1 and self.encode_prompt is not None
        cond = self._condition(prompts, cond, num_images_per_prompt, output_type)
        negative_cond = self._negative(use_negative, negative_cond, _rows(cond), num_images_per_prompt)
        if latents is None:
            latents = self.prepare_latents(_rows(cond), generator)
        x = scheduler_sample(
            self.velocity,
            latents.to(self.device),
            steps,
            cond=cond,
            negative_cond=negative_cond,
            guidance_scale=guidance_scale,
            scheduler=self.scheduler,
            pipeline=self.pipeline,
            sigmas=sigmas,
        )
        return self._output(x, output_type)
