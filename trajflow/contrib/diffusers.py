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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained
from ..checks import check_tensor, check_times
from ..conditioning import Condition, CondPart, CondSpec
from ..nn.patches import check_images, patchify, unpatchify
from ..velocity import VelocityModel

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["DiffusersVelocity", "UNet2DVelocity", "SD3Velocity", "FluxVelocity", "Flux2Velocity"]

V = TypeVar("V", bound="DiffusersVelocity")
T = TypeVar("T", bound="_TextTransformerVelocity")


def _diffusers_class(name: str) -> type[nn.Module]:
    """The class ``diffusers.<name>``, importing diffusers now; an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"trajflow.contrib.diffusers: wrapping a {name} needs the diffusers package: pip install diffusers "
            "(or trajflow[vae]); models are read from local folders only, nothing is downloaded"
        ) from e
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ImportError(
            f"trajflow.contrib.diffusers: the installed diffusers {diffusers.__version__} has no {name}; "
            "upgrade it (pip install -U diffusers)"
        )
    return cls


def _json_config(model: nn.Module) -> dict[str, Any]:
    """A diffusers model's config without diffusers' private keys (``_class_name``, ``_diffusers_version``...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}


class DiffusersVelocity(Pretrained, VelocityModel):
    r"""Base of the adapters of diffusers networks: the time conversion, local loading and saving.

    A subclass names the diffusers class it wraps (``diffusers_class``) and implements ``forward``; it calls
    the network at :meth:`timestep` and returns its output as :math:`v = \epsilon - x_0` (the module
    docstring gives diffusers' convention, which is trajflow's with :math:`\sigma = t`). The network is
    :attr:`model`, a submodule: it is fine-tuned with the adapter and deep-copied with it.

    Arguments:
        model: The diffusers network, an instance of ``diffusers_class``.
        num_train_timesteps: diffusers' timestep of :math:`t = 1` (the scheduler's ``num_train_timesteps``).
        validate_args: Check the values of ``t`` (in [0, 1]) and of the condition (a GPU synchronisation;
            switch it off in a tuned training loop). Shapes and dtypes are always checked.
    """

    diffusers_class: ClassVar[str] = ""
    model_argument: ClassVar[str] = "model"  # the constructor argument's name, for error messages

    def __init__(self, model: nn.Module, *, num_train_timesteps: int = 1000, validate_args: bool = True) -> None:
        super().__init__()
        expected = _diffusers_class(self.diffusers_class)
        if not isinstance(model, expected):
            raise ValueError(
                f"{self.model_argument}: expected a diffusers {self.diffusers_class}, got {type(model).__name__}"
            )
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected a positive integer, got {num_train_timesteps!r}")
        self.model = model
        self.num_train_timesteps = num_train_timesteps
        self.validate_args = bool(validate_args)

    def timestep(self, t: Tensor) -> Tensor:
        r"""diffusers' timestep of trajflow's time: ``num_train_timesteps * t`` (``timesteps = sigmas * 1000``)."""
        return self.num_train_timesteps * t

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments other than the network (JSON-serialisable)."""
        return {"num_train_timesteps": self.num_train_timesteps, "validate_args": self.validate_args}

    def config_dict(self) -> dict[str, Any]:
        """``{"model": <the network's diffusers config>, **settings}``: an untrained copy is built from it."""
        return {"model": _json_config(self.model), **self.settings()}

    @classmethod
    def from_config(cls: type[V], config: Mapping[str, Any]) -> V:
        settings = {k: v for k, v in config.items() if k != "model"}
        return cls(_diffusers_class(cls.diffusers_class).from_config(dict(config["model"])), **settings)

    @classmethod
    def from_diffusers(
        cls: type[V],
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> V:
        """The adapter of the network saved in the **local** diffusers folder ``path`` (``config.json`` and weights).

        Loads with ``from_pretrained(..., local_files_only=True)``: nothing is downloaded from a hub.

        Arguments:
            path: A folder written by diffusers' ``save_pretrained`` (or a pipeline folder, with ``subfolder``).
            subfolder: The network's folder inside ``path``, e.g. ``"unet"`` for a pipeline.
            torch_dtype: The dtype of the weights, as diffusers' ``from_pretrained``.
            **kwargs: The adapter's keyword arguments (``num_train_timesteps``, ...).
        """
        folder = Path(path).expanduser()
        where = folder / subfolder if subfolder else folder
        if not where.is_dir():
            raise ValueError(
                f"path: expected a local folder holding a diffusers {cls.diffusers_class} (config.json and "
                f"weights), got {str(where)!r}, which is not a folder; nothing is downloaded from a hub"
            )
        config_file = where / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"path: expected a diffusers {cls.diffusers_class} folder with a config.json, but "
                f"{str(config_file)!r} does not exist"
            )
        try:
            written_by = json.loads(config_file.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"path: {str(config_file)!r} is not a diffusers config (JSON object): {e}") from e
        if written_by is not None and written_by != cls.diffusers_class:
            raise ValueError(
                f"path: {str(config_file)!r} describes a diffusers {written_by}, expected a "
                f"{cls.diffusers_class} (use the adapter of that class)"
            )
        model = _diffusers_class(cls.diffusers_class).from_pretrained(
            str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype
        )
        return cls(model, **kwargs)

    def save_diffusers(self, directory: str | os.PathLike) -> Path:
        """Write the network as a diffusers folder (its ``save_pretrained``), readable by :meth:`from_diffusers`.

        Only the network is written; the adapter's own settings are not (pass them to :meth:`from_diffusers`).
        Use :meth:`save_pretrained` to keep them.
        """
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        return directory


class UNet2DVelocity(DiffusersVelocity):
    r"""A flow-matching diffusers ``UNet2DModel`` as a velocity model, hidden states included.

    ``forward(x_t, t, cond=None, drop_cond=None)`` returns ``(v, hidden)`` with
    ``v = unet(x_t, timestep=num_train_timesteps * t, class_labels=...).sample`` (float32, or ``x_t``'s dtype
    if wider) and ``hidden`` the feature map the UNet's output convolution ``conv_out`` reads (after its
    ``conv_norm_out`` and activation: the final-normed states, as
    :class:`~trajflow.velocity.TransformerVelocity` returns), ``(N, C', H, W)`` at full
    resolution with ``C' = block_out_channels[0]``, as tokens ``(N, H W, C')`` in raster order (patch size 1,
    :func:`trajflow.nn.patches.patchify`) in the UNet's dtype (``x_t`` is cast to it). The attributes
    ``hidden_features = C'``, ``hidden_layout = "tokens"`` and ``patch_size = 1`` are what
    :class:`~trajflow.predictors.FlowMatchingPredictor` reads, so
    :func:`trajflow.finetune.init_from_flow_matching` takes the adapter as it is. ``hidden`` is captured by a
    forward pre-hook on ``conv_out`` that lives only for the call.

    Conditions. A UNet with ``num_class_embeds = K`` (and no ``class_embed_type``) is class-conditional:
    ``cond`` is a LongTensor of labels ``(N,)`` in ``0..K-2``, and **the last class index** ``K - 1`` **is
    reserved as the null class** of classifier-free guidance: rows where ``drop_cond`` is True, and every row
    when ``cond`` is None, get label ``K - 1``. So ``cond_event_dims = 0`` and ``num_classes = K - 1``; train
    (or fine-tune) the UNet with guidance dropout to label ``K - 1`` for guidance to mean anything. An
    unconditional UNet refuses a ``cond``. Other ``class_embed_type`` s (``"timestep"``, ``"identity"``) and
    non-positional time embeddings are refused.

    Arguments:
        unet: A diffusers ``UNet2DModel`` trained as a flow-matching velocity model (see the module
            docstring), with as many output as input channels.
        sample_size: ``H`` or ``(H, W)`` of the images, by default the UNet's ``sample_size``; any size the
            UNet's downsampling divides works (the UNet is convolutional).
        num_train_timesteps: diffusers' timestep of :math:`t = 1`.
        validate_args: Check ``t`` in [0, 1] and the class labels' range (a GPU synchronisation).

    Example:
        >>> from diffusers import UNet2DModel  # doctest: +SKIP
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    layers_per_block=1, norm_num_groups=4, num_class_embeds=11,
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))  # doctest: +SKIP
        >>> velocity = UNet2DVelocity(unet)  # doctest: +SKIP
        >>> velocity.num_classes, velocity.null_class, velocity.hidden_features  # doctest: +SKIP
        (10, 10, 8)
        >>> v, hidden = velocity(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 9]))  # doctest: +SKIP
    """

    diffusers_class: ClassVar[str] = "UNet2DModel"
    model_argument: ClassVar[str] = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(unet, num_train_timesteps=num_train_timesteps, validate_args=validate_args)
        config = unet.config
        if config.in_channels != config.out_channels:
            raise ValueError(
                f"unet: expected as many output as input channels (a velocity has the image's shape), got "
                f"in_channels={config.in_channels}, out_channels={config.out_channels}"
            )
        if config.time_embedding_type != "positional":
            raise ValueError(
                f"unet: expected time_embedding_type='positional' (a flow-matching UNet called at "
                f"{num_train_timesteps} t), got {config.time_embedding_type!r}"
            )
        if config.class_embed_type is not None:
            raise ValueError(
                f"unet: expected class_embed_type=None (labels through num_class_embeds), got "
                f"{config.class_embed_type!r}"
            )
        size = config.sample_size if sample_size is None else sample_size
        if size is None:
            raise ValueError("sample_size: the UNet's config has no sample_size, expected an int or (H, W), got None")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        factor = 2 ** (len(config.block_out_channels) - 1)
        if min(height, width) < 1 or height % factor or width % factor:
            raise ValueError(
                f"sample_size: expected a positive (H, W) divisible by the UNet's downsampling factor {factor}, "
                f"got {size!r}"
            )
        self.sample_size = (int(height), int(width))
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.hidden_features = int(config.block_out_channels[0])
        self.hidden_layout = "tokens"
        self.patch_size = 1
        embeds = config.num_class_embeds
        if embeds is not None and embeds < 2:
            raise ValueError(
                f"unet: a class-conditional UNet needs num_class_embeds >= 2 (the last is the null class), got {embeds}"
            )
        self.num_classes: int | None = None if embeds is None else embeds - 1
        self.null_class: int | None = self.num_classes  # the last class index
        self.cond_event_dims = None if embeds is None else 0
        self.cond_spec = None
        if embeds is not None:  # checked where the condition enters (trajflow.conditioning.check_cond)
            self.cond_spec = CondSpec(
                (CondPart("class labels", (), "integer", self.num_classes),),
                hint=f" (label {self.null_class} is the reserved null class; use drop_cond)",
            )

    @property
    def unet(self) -> UNet2DModel:
        """The wrapped ``UNet2DModel``."""
        return self.model  # type: ignore[return-value]

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), **super().settings()}

    def _labels(self, cond: Condition | None, drop_cond: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """The UNet's ``class_labels`` ``(n,)``: ``cond`` with the null class where dropped (None: unconditional)."""
        if self.null_class is None:
            return None
        null = torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if cond is None:
            return null
        labels = cond.to(device=device, dtype=torch.long)
        return labels if drop_cond is None else torch.where(drop_cond, null, labels)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape ``(N, C, H, W)`` and ``hidden`` ``(N, H W, C')``."""
        check_images("x_t", x_t, self.event_shape, flat=True)
        n = x_t.shape[0]
        check_tensor("t", t)
        if t.shape != (n,) or not t.is_floating_point():
            raise ValueError(
                f"t: expected a float tensor of shape ({n},) (one time per image), got {t.dtype} "
                f"of shape {tuple(t.shape)}"
            )
        if self.validate_args:
            check_times("t", t)
        labels = self._labels(cond, drop_cond, n, x_t.device)
        captured: list[Tensor] = []
        handle = self.model.conv_out.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            v = self.model(x_t.to(self.model.dtype), self.timestep(t), class_labels=labels).sample
        finally:
            handle.remove()
        hidden = patchify(captured[-1], 1)  # (N, C', H, W) -> (N, H W, C'), raster order
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), hidden


# -- text-to-image transformers: SD3, FLUX.1, FLUX.2 -------------------------------------------------------------


def _image_size(name: str, size: object, what: str) -> tuple[int, int]:
    """``(H, W)`` of an int or a pair; a ValueError naming ``name`` otherwise."""
    if size is None:
        raise ValueError(f"{name}: {what} has no sample size in its config, expected the latent (H, W), got None")
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ValueError(f"{name}: expected a positive int or (H, W), got {size!r}")
    return int(size[0]), int(size[1])


class _TextTransformerVelocity(DiffusersVelocity):
    r"""The part the SD3 / FLUX adapters share: the text condition, its null, the hidden-state hook, ``forward``.

    A subclass sets ``pooled`` (whether the network takes pooled embeddings), builds ``event_shape``,
    ``patch_size`` and ``sample_size``, and implements :meth:`_velocity` (the network call in trajflow's
    layout: latents ``(N, C, H, W)`` in, :math:`v` of the same shape out).
    """

    pooled: ClassVar[bool] = True
    model_argument: ClassVar[str] = "transformer"

    def __init__(
        self,
        transformer: nn.Module,
        *,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(transformer, num_train_timesteps=num_train_timesteps, validate_args=validate_args)
        config = transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ValueError(
                f"transformer: expected as many output as input channels (a velocity has the latent's shape), got "
                f"in_channels={config.in_channels}, out_channels={config.out_channels}"
            )
        self.text_features = int(config.joint_attention_dim)
        self.pooled_features: int | None = int(config.pooled_projection_dim) if self.pooled else None
        self.cond_event_dims = (2, 1) if self.pooled else 2
        self.hidden_features = int(config.num_attention_heads * config.attention_head_dim)
        self.hidden_layout = "tokens"
        prompt, pooled = self._parse_null(null_cond)
        self.register_buffer("null_prompt_embeds", prompt)
        self.register_buffer("null_pooled_embeds", pooled)

    # -- the text condition ------------------------------------------------------------------------------------

    def _parse_null(self, null_cond: Condition | None) -> tuple[Tensor | None, Tensor | None]:
        """``null_cond`` without batch dims (or with a batch of 1), checked: ``(prompt (L, D), pooled (P,))``."""
        if null_cond is None:
            return None, None
        parts = null_cond if isinstance(null_cond, tuple) else (null_cond,)
        want = 2 if self.pooled else 1
        form = "(prompt_embeds (L, D), pooled_embeds (P,))" if self.pooled else "a tensor prompt_embeds (L, D)"
        if len(parts) != want or not all(isinstance(p, Tensor) for p in parts):
            raise ValueError(
                f"null_cond: expected {form} (one condition, no batch dim), got {type(null_cond).__name__}"
            )
        prompt = parts[0].detach()
        if prompt.dim() == 3 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 2 or prompt.shape[-1] != self.text_features or not prompt.is_floating_point():
            raise ValueError(
                f"null_cond: expected prompt embeddings (L, {self.text_features}) (the network's joint_attention_dim), "
                f"got {prompt.dtype} of shape {tuple(parts[0].shape)}"
            )
        if not self.pooled:
            return prompt.clone(), None
        pooled = parts[1].detach()
        if pooled.dim() == 2 and pooled.shape[0] == 1:
            pooled = pooled[0]
        if pooled.shape != (self.pooled_features,) or not pooled.is_floating_point():
            raise ValueError(
                f"null_cond: expected pooled embeddings ({self.pooled_features},) (the network's "
                f"pooled_projection_dim), got {pooled.dtype} of shape {tuple(parts[1].shape)}"
            )
        return prompt.clone(), pooled.clone()

    @property
    def null_cond(self) -> Condition | None:
        """The null condition of guidance dropout given at construction (no batch dim), or None (zeros)."""
        if self.null_prompt_embeds is None:
            return None
        return (self.null_prompt_embeds, self.null_pooled_embeds) if self.pooled else self.null_prompt_embeds

    @property
    def cond_spec(self) -> CondSpec:
        """The text condition (checked where it enters, by :func:`trajflow.conditioning.check_cond`):
        ``prompt_embeds (N, L, D)`` (and ``pooled_embeds (N, P)``); ``None`` only with a ``null_cond``."""
        parts = (CondPart("prompt embeddings", (None, self.text_features), "float"),)
        if self.pooled:
            parts += (CondPart("pooled embeddings", (self.pooled_features,), "float"),)
        hint = " (for unconditional calls pass null_cond=... at construction, e.g. the empty prompt's embeddings)"
        return CondSpec(parts, null=self.null_prompt_embeds is not None, hint=hint)

    def _text(self, cond: Condition | None, drop_cond: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
        """The network's ``(prompt_embeds (n, L, D), pooled (n, P) or None)``, null rows where dropped."""
        if cond is None:  # the null condition everywhere (the edge made sure there is one)
            prompt = self.null_prompt_embeds.expand(n, -1, -1)
            pooled = None if self.null_pooled_embeds is None else self.null_pooled_embeds.expand(n, -1)
            return prompt, pooled
        prompt, pooled = cond if isinstance(cond, tuple) else (cond, None)
        if drop_cond is None:
            return prompt, pooled
        drop = drop_cond.to(prompt.device)
        if self.null_prompt_embeds is None:  # zeros
            null_prompt = prompt.new_zeros(())
            null_pooled = None if pooled is None else pooled.new_zeros(())
        else:
            null_prompt = self.null_prompt_embeds.to(prompt)
            if null_prompt.shape[0] != prompt.shape[1]:
                raise ValueError(
                    f"null_cond: its {null_prompt.shape[0]} text tokens cannot replace dropped rows of a condition "
                    f"with {prompt.shape[1]} tokens; encode the null prompt padded to the same length"
                )
            null_pooled = None if pooled is None else self.null_pooled_embeds.to(pooled)
        prompt = torch.where(drop[:, None, None], null_prompt, prompt)
        if pooled is not None:
            pooled = torch.where(drop[:, None], null_pooled, pooled)
        return prompt, pooled

    # -- saving ------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        length = None if self.null_prompt_embeds is None else int(self.null_prompt_embeds.shape[0])
        return {"null_text_length": length, **super().settings()}

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """An untrained copy; a null condition of ``null_text_length`` tokens is zeros until the weights load."""
        settings = {k: v for k, v in config.items() if k not in ("model", "null_text_length")}
        length = config.get("null_text_length")
        model = _diffusers_class(cls.diffusers_class).from_config(dict(config["model"]))
        null: Condition | None = None
        if length is not None:
            prompt = torch.zeros(length, model.config.joint_attention_dim)
            null = (prompt, torch.zeros(model.config.pooled_projection_dim)) if cls.pooled else prompt
        return cls(model, null_cond=null, **settings)

    # -- the call ----------------------------------------------------------------------------------------------

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape ``(N, C, H, W)`` and ``hidden`` ``(N, L_img, width)``."""
        check_images("x_t", x_t, self.event_shape, flat=True)
        n = x_t.shape[0]
        check_tensor("t", t)
        if t.shape != (n,) or not t.is_floating_point():
            raise ValueError(
                f"t: expected a float tensor of shape ({n},) (one time per latent), got {t.dtype} "
                f"of shape {tuple(t.shape)}"
            )
        if self.validate_args:
            check_times("t", t)
        prompt, pooled = self._text(cond, drop_cond, n)
        dtype = self.model.dtype
        prompt = prompt.to(device=x_t.device, dtype=dtype)
        pooled = None if pooled is None else pooled.to(device=x_t.device, dtype=dtype)
        captured: list[Tensor] = []
        # The image tokens the output projection reads (after the final AdaLN norm_out), (N, L_img, width).
        handle = self.model.proj_out.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            v = self._velocity(x_t.to(dtype), t, prompt, pooled)
        finally:
            handle.remove()
        return v.to(torch.promote_types(x_t.dtype, torch.float32)), captured[-1]


class SD3Velocity(_TextTransformerVelocity):
    r"""A diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) as a text-conditional velocity model.

    The conversion (diffusers 0.42): ``StableDiffusion3Pipeline.__call__`` calls
    ``transformer(hidden_states=latents, timestep=t.expand(N), encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled_prompt_embeds)`` with ``t`` from ``FlowMatchEulerDiscreteScheduler.timesteps``
    (``sigmas * num_train_timesteps``) and hands the output to ``scheduler.step`` unchanged (the module
    docstring: an Euler step of :math:`dx/d\sigma = v`). So

    ``v = transformer(x_t, timestep=num_train_timesteps * t, encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled_embeds).sample``

    on latents ``x_t`` ``(N, C, H, W)`` as the pipeline holds them (the VAE's latents after
    ``(z - shift_factor) * scaling_factor``). ``forward(x_t, t, cond, drop_cond)`` returns ``(v, hidden)``:
    ``v`` float32 (or ``x_t``'s dtype if wider); ``hidden`` the image tokens that ``proj_out`` reads (after the
    final AdaLN ``norm_out``), ``(N, H W / p^2, width)`` with ``p = config.patch_size`` and
    ``width = num_attention_heads * attention_head_dim``, in the raster order of ``PatchEmbed``'s strided
    convolution, which is :func:`trajflow.nn.patches.patchify`'s. ``hidden_features``, ``hidden_layout =
    "tokens"`` and ``patch_size = p`` are what :class:`~trajflow.predictors.FlowMatchingPredictor` reads, so
    :func:`trajflow.finetune.init_from_flow_matching` takes the adapter as it is.

    The condition. ``cond = (prompt_embeds, pooled_embeds)``: ``(N, L, joint_attention_dim)`` and
    ``(N, pooled_projection_dim)``, what the pipeline's ``encode_prompt`` returns (CLIP and T5 features
    concatenated); ``cond_event_dims = (2, 1)``. It is not trajflow's ``(features, mask)``: the network takes no
    mask, padded tokens are attended to as in the pipeline. Rows where ``drop_cond`` is True take the **null
    condition**: ``null_cond`` given at construction (one ``(prompt_embeds (L, D), pooled_embeds (P,))``,
    no batch dim or a batch of 1; the pipeline's choice is the empty prompt's ``encode_prompt("")``, its
    default negative prompt), or **zeros** of the condition's shape without one. ``cond=None`` means the null
    condition everywhere and needs ``null_cond``. The null is a buffer (saved, not trained).

    Arguments:
        transformer: A diffusers ``SD3Transformer2DModel`` (as many output as input channels).
        sample_size: The latent ``H`` or ``(H, W)``, by default the config's ``sample_size``; a multiple of
            the patch size, at most ``pos_embed_max_size`` patches a side.
        null_cond: The null condition of guidance dropout (see above), or None for zeros.
        num_train_timesteps: diffusers' timestep of :math:`t = 1`.
        validate_args: Check ``t`` in [0, 1] (a GPU synchronisation).

    Example:
        >>> from diffusers import SD3Transformer2DModel  # doctest: +SKIP
        >>> net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        ...     pooled_projection_dim=10, pos_embed_max_size=8)  # doctest: +SKIP
        >>> velocity = SD3Velocity(net)  # doctest: +SKIP
        >>> cond = (torch.randn(3, 5, 12), torch.randn(3, 10))  # doctest: +SKIP
        >>> v, hidden = velocity(torch.randn(3, 4, 8, 8), torch.rand(3), cond)  # doctest: +SKIP
        >>> v.shape, hidden.shape  # doctest: +SKIP
        (torch.Size([3, 4, 8, 8]), torch.Size([3, 16, 16]))
    """

    diffusers_class: ClassVar[str] = "SD3Transformer2DModel"
    pooled: ClassVar[bool] = True

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        p = int(config.patch_size)
        height, width = _image_size(
            "sample_size", config.sample_size if sample_size is None else sample_size, self.diffusers_class
        )
        limit = config.pos_embed_max_size
        if height % p or width % p or (limit is not None and max(height, width) > limit * p):
            bound = "" if limit is None else f", at most pos_embed_max_size * patch_size = {limit * p}"
            raise ValueError(
                f"sample_size: expected a latent (H, W) divisible by the patch size {p}{bound}, got {sample_size!r} "
                f"-> {(height, width)}"
            )
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.patch_size = p

    @property
    def transformer(self) -> nn.Module:
        """The wrapped ``SD3Transformer2DModel``."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), **super().settings()}

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        # StableDiffusion3Pipeline.__call__: timestep = t.expand(N), t in scheduler.timesteps = 1000 sigma; the
        # output goes to FlowMatchEulerDiscreteScheduler.step as is (prev = sample + (sigma_next - sigma) * out).
        return self.model(
            hidden_states=x,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=self.timestep(t),
            return_dict=False,
        )[0]


def _guidance_setting(config: Any, guidance: float | None, default: float, name: str) -> float | None:
    """The guidance-embedding value of a guidance-distilled FLUX (``None`` for one without the embedding)."""
    if not config.guidance_embeds:
        if guidance is not None:
            raise ValueError(
                f"guidance: this {name} has no guidance embedding (guidance_embeds=False), expected None, got "
                f"{guidance!r}"
            )
        return None
    if guidance is None:
        return default
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance == guidance:
        raise ValueError(f"guidance: expected a number (the distilled guidance scale), got {guidance!r}")
    return float(guidance)


class _FluxFamily(_TextTransformerVelocity):
    """What FLUX.1 and FLUX.2 share: a latent ``sample_size`` and an optional distilled guidance embedding."""

    sample_size: tuple[int, int]
    guidance: float | None

    @property
    def transformer(self) -> nn.Module:
        """The wrapped FLUX transformer."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), "guidance": self.guidance, **super().settings()}

    def _guidance(self, n: int, device: torch.device) -> Tensor | None:
        """The guidance embedding's input, as the pipelines pass it: ``torch.full([1], scale).expand(N)``, float32."""
        if self.guidance is None:
            return None
        return torch.full((n,), self.guidance, device=device, dtype=torch.float32)


class FluxVelocity(_FluxFamily):
    r"""A diffusers ``FluxTransformer2DModel`` (FLUX.1) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``pipeline_flux.py``, ``FluxPipeline``):

    * latents: ``prepare_latents`` draws ``(N, C, H, W)`` noise and ``_pack_latents`` packs 2x2 patches,
      ``view(N, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5)`` -> ``(N, H W / 4, 4 C)``: raster order, channels
      ``(c, dy, dx)``, which is :func:`trajflow.nn.patches.patchify` ``(x, 2)``. trajflow's latent is the unpacked
      ``(C, H, W)`` with ``C = in_channels / 4`` (``_unpack_latents`` is the inverse, :func:`unpatchify`);
      the scheduler acts per element, so the packing commutes with it.
    * ids: ``_prepare_latent_image_ids`` gives the token of patch row ``i``, column ``j`` the id ``(0, i, j)``;
      ``encode_prompt`` gives text ids zeros ``(L, 3)``.
    * time: ``__call__`` passes ``timestep = t.expand(N).to(latents.dtype) / 1000`` (``t`` in
      ``scheduler.timesteps``, :math:`1000 \sigma`) and ``FluxTransformer2DModel.forward`` multiplies by 1000
      again: the adapter passes ``num_train_timesteps * t / 1000``, i.e. :math:`\sigma = t` itself.
    * guidance: a guidance-distilled model (``guidance_embeds=True``, FLUX.1-dev) gets
      ``guidance = full((N,), guidance_scale)`` (``forward`` multiplies it by 1000 too); ``guidance`` here,
      the pipeline's default 3.5. trajflow's own classifier-free ``guidance`` is applied on top of it.
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0` (packed), unpacked here.

    ``forward(x_t, t, cond, drop_cond)`` returns ``(v, hidden)``, ``v`` ``(N, C, H, W)`` float32 (or wider) and
    ``hidden`` the image tokens ``proj_out`` reads, ``(N, H W / 4, width)``; ``patch_size = 2`` (the packing).
    The condition is SD3's (:class:`SD3Velocity`): ``(prompt_embeds (N, L, joint_attention_dim),
    pooled_embeds (N, pooled_projection_dim))`` (T5 and CLIP), ``cond_event_dims = (2, 1)``, a null condition
    ``null_cond`` or zeros. FLUX.1 was not trained with a null prompt; the null matters once an NTM is
    fine-tuned with guidance dropout.

    Arguments:
        transformer: A diffusers ``FluxTransformer2DModel`` with ``patch_size = 1`` and ``in_channels`` a
            multiple of 4 (the packed latent, as FLUX.1's 64 = 4 x 16).
        sample_size: The latent ``H`` or ``(H, W)`` (even; FLUX's config has none): the VAE latent, 1/8 of the
            image side for FLUX.1's VAE.
        guidance: The distilled guidance scale of a model with ``guidance_embeds`` (default 3.5, the pipeline's);
            must be None for one without.
        null_cond, num_train_timesteps, validate_args: As :class:`SD3Velocity`.
    """

    diffusers_class: ClassVar[str] = "FluxTransformer2DModel"
    pooled: ClassVar[bool] = True
    default_guidance: ClassVar[float] = 3.5  # FluxPipeline.__call__(guidance_scale=3.5)

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        guidance: float | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        if config.patch_size != 1 or config.in_channels % 4:
            raise ValueError(
                f"transformer: expected patch_size=1 and in_channels a multiple of 4 (2x2-packed latents, as "
                f"FluxPipeline._pack_latents), got patch_size={config.patch_size}, in_channels={config.in_channels}"
            )
        height, width = _image_size("sample_size", sample_size, self.diffusers_class)
        if height % 2 or width % 2:
            raise ValueError(f"sample_size: expected an even latent (H, W) (2x2 packing), got {(height, width)}")
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels // 4, height, width))
        self.patch_size = 2
        self.guidance = _guidance_setting(config, guidance, self.default_guidance, self.diffusers_class)
        # FluxPipeline._prepare_latent_image_ids(N, H / 2, W / 2): id (0, row, col) of each packed token.
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        self.register_buffer("img_ids", ids.reshape(-1, 3), persistent=False)

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n = x.shape[0]
        tokens = patchify(x, 2)  # == FluxPipeline._pack_latents: (N, C, H, W) -> (N, H W / 4, 4 C)
        guidance = self._guidance(n, x.device)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            # FluxPipeline.__call__: timestep = t.expand(N).to(latents.dtype), passed as timestep / 1000
            timestep=self.timestep(t).to(x.dtype) / 1000,
            img_ids=self.img_ids.to(x.device),
            txt_ids=torch.zeros(prompt.shape[1], 3, device=x.device),  # FluxPipeline.encode_prompt: text_ids
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpatchify(out, 2, self.event_shape)  # == FluxPipeline._unpack_latents


class Flux2Velocity(_FluxFamily):
    r"""A diffusers ``Flux2Transformer2DModel`` (FLUX.2 dev / klein) as a text-conditional velocity model.

    The conversion (diffusers 0.42, ``pipeline_flux2_klein.py``, ``Flux2KleinPipeline``; ``Flux2Pipeline`` is
    the same):

    * latents: ``prepare_latents`` draws its noise already 2x2-patchified, ``(N, 4 C, H / 2, W / 2)``
      (``_patchify_latents`` maps the VAE latent there, and the VAE's batch-norm statistics normalise it in
      that space), and ``_pack_latents`` flattens it to tokens ``reshape(N, C', H' W').permute(0, 2, 1)``.
      trajflow's latent is that patchified ``(C', H', W')`` with ``C' = in_channels``: the flow runs there, the
      tokens are its raster order and ``patch_size = 1``.
    * ids: ``_prepare_latent_ids`` gives token ``(i, j)`` the id ``(0, i, j, 0)``, ``_prepare_text_ids`` gives
      text token ``l`` the id ``(0, 0, 0, l)``.
    * time: as FLUX.1, ``timestep = t / 1000`` with ``t`` in ``scheduler.timesteps`` and ``forward``
      multiplies by 1000: the adapter passes ``num_train_timesteps * t / 1000``.
    * guidance: ``Flux2Pipeline`` passes ``guidance = full((N,), guidance_scale)`` (default 4.0) to models
      with ``guidance_embeds``; ``Flux2KleinPipeline`` passes None (klein has no guidance embedding).
    * the output goes to ``scheduler.step`` unchanged: :math:`v = \epsilon - x_0`.

    The condition is ``prompt_embeds`` ``(N, L, joint_attention_dim)`` alone (FLUX.2 has no pooled
    embedding), ``cond_event_dims = 2``; the null condition is ``null_cond`` (``(L, D)``; the klein
    pipeline's negative prompt is ``""``) or zeros. ``hidden`` is ``(N, H' W', width)``, what ``proj_out``
    reads.

    Arguments:
        transformer: A diffusers ``Flux2Transformer2DModel`` with ``patch_size = 1``.
        sample_size: The token grid ``H'`` or ``(H', W')`` (FLUX.2's config has none): the VAE latent's side / 2,
            i.e. the image side / 16.
        guidance: The distilled guidance scale of a model with ``guidance_embeds`` (default 4.0, the pipeline's);
            must be None for one without.
        null_cond, num_train_timesteps, validate_args: As :class:`SD3Velocity`.
    """

    diffusers_class: ClassVar[str] = "Flux2Transformer2DModel"
    pooled: ClassVar[bool] = False
    default_guidance: ClassVar[float] = 4.0  # Flux2Pipeline.__call__(guidance_scale=4.0)

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sample_size: int | tuple[int, int] | list[int] | None = None,
        guidance: float | None = None,
        null_cond: Condition | None = None,
        num_train_timesteps: int = 1000,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            transformer, null_cond=null_cond, num_train_timesteps=num_train_timesteps, validate_args=validate_args
        )
        config = transformer.config
        if config.patch_size != 1:
            raise ValueError(
                f"transformer: expected patch_size=1 (Flux2Pipeline packs 1x1 tokens), got {config.patch_size}"
            )
        height, width = _image_size("sample_size", sample_size, self.diffusers_class)
        self.sample_size = (height, width)
        self.event_shape = torch.Size((config.in_channels, height, width))
        self.patch_size = 1
        self.guidance = _guidance_setting(config, guidance, self.default_guidance, self.diffusers_class)
        # Flux2KleinPipeline._prepare_latent_ids: cartesian_prod(t=[0], h, w, l=[0]) -> (H' W', 4)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
        self.register_buffer("img_ids", ids, persistent=False)

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)  # == Flux2KleinPipeline._pack_latents
        # Flux2KleinPipeline._prepare_text_ids: cartesian_prod(t=[0], h=[0], w=[0], l) -> (L, 4)
        zero = torch.zeros(1, dtype=torch.long)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(prompt.shape[1])).to(x.device)
        guidance = self._guidance(n, x.device)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=prompt,
            # Flux2KleinPipeline.__call__: timestep = t.expand(N).to(latents.dtype), passed as timestep / 1000
            timestep=self.timestep(t).to(x.dtype) / 1000,
            img_ids=self.img_ids.to(x.device),
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(n, c, h, w)  # == _unpack_latents_with_ids for raster ids


# -- the sampler pipeline: prompts -> the pipeline's text encoders -> NTM steps (or diffusers' scheduler) -> VAE ---

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
    if not folder.is_dir():
        raise ValueError(
            f"path: expected a local diffusers pipeline folder (model_index.json, text encoders, vae, scheduler, "
            f"transformer), got {str(folder)!r}, which is not a folder; nothing is downloaded from a hub"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"path: expected a diffusers pipeline folder with a model_index.json, but {str(index)!r} does not exist "
            "(a folder holding one model takes the adapters' from_diffusers instead)"
        )
    try:
        record = json.loads(index.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"path: {str(index)!r} is not a diffusers model index (a JSON object): {e}") from e
    return folder, record


def load_diffusers_pipeline(
    path: str | os.PathLike,
    *,
    transformer: nn.Module | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """A diffusers pipeline read from the **local** folder ``path`` (``local_files_only=True``).

    Its transformer is not loaded unless one is passed (``transformer=``): the NTM or the adapter holds the
    network, and the pipeline object is wanted for its text encoders, tokenizers, VAE and scheduler (a
    pipeline whose ``encode_prompt`` reads the transformer's config, SD3 without T5, needs it passed).

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

    Calls ``pipe.encode_prompt`` as the pipeline's ``__call__`` does for one image per prompt and no guidance
    (the null condition is encoded as its own prompt, ``""`` by default), so the embeddings are a diffusers
    user's: ``StableDiffusion3Pipeline`` (CLIP-L, CLIP-G and T5, or zeros without T5) and ``FluxPipeline``
    (CLIP and T5) give ``(prompt_embeds, pooled_prompt_embeds)``; ``Flux2KleinPipeline`` / ``Flux2Pipeline``
    (Qwen3 / Mistral) give ``prompt_embeds``. The text encoders run in their own dtype with autocast off; the
    embeddings come back in that dtype, without gradients.

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
        if max_sequence_length is not None and (
            isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1
        ):
            raise ValueError(f"max_sequence_length: expected a positive integer or None, got {max_sequence_length!r}")
        self.pipe = pipe
        self.pipeline = name
        self.max_sequence_length = max_sequence_length
        self.device = None if device is None else torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str]) -> Condition:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
        device = self.device or self.pipe._execution_device
        kwargs: dict[str, Any] = {"device": device}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            if self.pipeline == "StableDiffusion3Pipeline":
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, **kwargs
                )
                return embeds, pooled
            if self.pipeline == "FluxPipeline":
                embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, **kwargs)
                return embeds, pooled
            embeds, _ = self.pipe.encode_prompt(prompt=prompts, **kwargs)  # FLUX.2: no pooled embedding
            return embeds


class PipelineVAE(nn.Module):
    r"""A diffusers pipeline's VAE as its pipeline maps latents to images and back, in **float32**.

    The VAE is cast to float32 and frozen here, and runs with autocast off whatever the model's precision: an
    fp16 VAE decode gives NaNs or black images. Two layouts:

    * ``"scaled"`` (``AutoencoderKL``: SD3, FLUX.1 and most others): the latent is
      ``(z - shift_factor) * scaling_factor`` with ``z`` the VAE's latent; ``decode`` applies
      ``z = latent / scaling_factor + shift_factor`` (``StableDiffusion3Pipeline`` / ``FluxPipeline``, after
      unpacking) before ``vae.decode``.
    * ``"flux2"`` (``AutoencoderKLFlux2``): the latent is the VAE's latent 2x2-patchified (``(4 C, H / 2, W / 2)``,
      ``Flux2Pipeline._patchify_latents``) and normalised by the VAE's batch-norm statistics,
      ``(z - running_mean) / sqrt(running_var + batch_norm_eps)``; ``decode`` inverts both
      (``Flux2KleinPipeline.__call__``).

    ``encode`` takes images in ``[-1, 1]`` and returns the latents of the posterior mean (deterministic), or of
    a posterior sample with ``generator``. ``decode`` returns images in ``[-1, 1]`` (not clipped);
    :meth:`to_unit` maps them to ``[0, 1]`` as ``VaeImageProcessor.postprocess`` does.

    Arguments:
        vae: The pipeline's ``AutoencoderKL`` or ``AutoencoderKLFlux2``.
        layout: ``"scaled"`` or ``"flux2"``; by default from the VAE's class.
    """

    def __init__(self, vae: nn.Module, *, layout: str | None = None) -> None:
        super().__init__()
        if not isinstance(vae, nn.Module) or not hasattr(vae, "config") or not hasattr(vae, "decode"):
            raise ValueError(f"vae: expected a diffusers autoencoder (AutoencoderKL, ...), got {type(vae).__name__}")
        layout = layout or ("flux2" if type(vae).__name__ == "AutoencoderKLFlux2" else "scaled")
        if layout not in ("scaled", "flux2"):
            raise ValueError(f"layout: expected 'scaled' or 'flux2', got {layout!r}")
        if layout == "flux2" and not isinstance(getattr(vae, "bn", None), nn.BatchNorm2d):
            raise ValueError(
                f"vae: the 'flux2' layout needs an AutoencoderKLFlux2 (with a bn), got {type(vae).__name__}"
            )
        if any(p.dtype != torch.float32 for p in vae.parameters()):
            vae = vae.to(torch.float32)
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.layout = layout
        self.vae_scale_factor = 2 ** (len(config.block_out_channels) - 1)  # pixels per VAE latent, as the pipelines
        channels = int(config.latent_channels)
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.channels = channels if layout == "scaled" else 4 * channels
        self.factor = self.vae_scale_factor if layout == "scaled" else 2 * self.vae_scale_factor  # pixels per latent

    def train(self, mode: bool = True) -> PipelineVAE:
        """The VAE stays in eval mode (its batch-norm statistics are the latent normalisation)."""
        super().train(mode)
        self.vae.eval()
        return self

    def latent_shape(self, height: int, width: int | None = None) -> torch.Size:
        """``(C, H / f, W / f)`` of the latents of ``height x width`` px images (``f``: :attr:`factor`)."""
        width = height if width is None else width
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < 1 or side % self.factor:
                raise ValueError(
                    f"{name}: expected a positive multiple of {self.factor} (the pipeline's pixels per latent), "
                    f"got {side!r}"
                )
        return torch.Size((self.channels, height // self.factor, width // self.factor))

    def _bn(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)
        return mean, std

    @torch.no_grad()
    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(N, 3, H, W)`` in ``[-1, 1]`` -> latents ``(N, C, H / f, W / f)``, float32."""
        check_tensor("images", images)
        if images.dim() != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"images: expected (N, {self.vae.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        with torch.autocast(device_type=images.device.type, enabled=False):
            dist = self.vae.encode(images.float()).latent_dist
            z = dist.mean if generator is None else dist.sample(generator)
            if self.layout == "scaled":
                return (z - self.shift_factor) * self.scaling_factor
            n, c, h, w = z.shape  # Flux2Pipeline._patchify_latents, then the batch-norm normalisation
            z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
            mean, std = self._bn(z)
            return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(N, C, h, w)`` -> images ``(N, 3, h f, w f)`` in ``[-1, 1]`` (unclipped), float32."""
        check_tensor("latents", latents)
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents: expected (N, {self.channels}, h, w), got shape {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            z = latents.float()
            if self.layout == "scaled":
                z = z / self.scaling_factor + self.shift_factor
            else:
                mean, std = self._bn(z)
                n, c, h, w = z.shape  # Flux2Pipeline._unpatchify_latents
                z = (z * std + mean).reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
                z = z.reshape(n, c // 4, 2 * h, 2 * w)
            return self.vae.decode(z, return_dict=False)[0].float()

    @staticmethod
    def to_unit(images: Tensor) -> Tensor:
        """``[-1, 1]`` -> ``[0, 1]``, clipped (``VaeImageProcessor.denormalize``)."""
        return (images / 2 + 0.5).clamp(0, 1)


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

    ``StableDiffusion3Pipeline`` (and ``pipeline=None``): the scheduler's own spacing (``set_timesteps(steps)``),
    with ``calculate_shift(image_seq_len, ...)`` as ``mu`` when its config has ``use_dynamic_shifting``.
    ``FluxPipeline``: sigmas ``linspace(1, 1 / steps, steps)`` (none with ``use_flow_sigmas``) and
    ``mu = calculate_shift(image_seq_len, ...)``. ``Flux2KleinPipeline`` / ``Flux2Pipeline``: the same sigmas
    and ``mu = compute_empirical_mu(image_seq_len, steps)``. The shift functions are diffusers' own. ``sigmas``
    overrides the spacing (as the pipelines' ``sigmas=`` argument); ``image_seq_len`` is the number of image
    tokens the transformer sees (SD3: ``(H / p) (W / p)``; FLUX.1: packed ``H W / 4``; FLUX.2: ``H' W'``).
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps: expected a positive number of steps, got {steps}")
    if pipeline is not None and pipeline not in PIPELINE_ADAPTERS:
        raise ValueError(f"pipeline: expected None or one of {sorted(PIPELINE_ADAPTERS)}, got {pipeline!r}")
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ValueError(
            "scheduler: invert_sigmas schedulers (Mochi) are not flow-matching samplers of this convention"
        )
    config = scheduler.config
    kwargs: dict[str, Any] = {}
    flux = pipeline is not None and pipeline.startswith("Flux")
    if flux and sigmas is None and not getattr(config, "use_flow_sigmas", False):
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)
    if pipeline in ("Flux2KleinPipeline", "Flux2Pipeline"):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        kwargs["mu"] = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    elif pipeline == "FluxPipeline" or config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    if sigmas is not None:  # retrieve_timesteps(scheduler, steps, device, sigmas=..., mu=...)
        scheduler.set_timesteps(sigmas=list(sigmas), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
    return scheduler.timesteps


def _cat_cond(a: Condition, b: Condition) -> Condition:
    return tuple(torch.cat([x, y]) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.cat([a, b])


def _repeat_cond(cond: Condition, k: int) -> Condition:
    if k == 1:
        return cond
    if isinstance(cond, tuple):
        return tuple(c.repeat_interleave(k, dim=0) for c in cond)
    return cond.repeat_interleave(k, dim=0)


def _cond_rows(cond: Condition) -> int:
    return int((cond[0] if isinstance(cond, tuple) else cond).shape[0])


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

    The loop of the diffusers pipeline ``pipeline`` (timesteps from :func:`set_pipeline_timesteps`), with the
    network called through its adapter at :math:`t = \sigma` (the adapter's ``timestep = 1000 t`` is then the
    scheduler's ``timesteps = sigmas * 1000``, the same float32 product) and the output handed to
    ``scheduler.step`` unchanged. Classifier-free guidance is diffusers': with ``guidance_scale > 1``,
    ``v = v_u + guidance_scale (v_c - v_u)`` from one batched call on ``[negative, positive]`` as
    ``StableDiffusion3Pipeline`` does, where ``v_u`` reads ``negative_cond`` (the pipeline encodes its
    ``negative_prompt``, ``""`` by default) or, without one, the adapter's null condition. trajflow's weight
    ``w`` (:func:`~trajflow.baselines.flow_matching.euler_sample`) is ``guidance_scale - 1``. The latents stay
    float32 (the adapters return float32 velocities); a diffusers pipeline holds them in the text encoder's
    dtype, which is the same loop in float32.

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
    import copy

    if scheduler is None:
        scheduler = _diffusers_class("FlowMatchEulerDiscreteScheduler")()
    else:
        scheduler = copy.deepcopy(scheduler)
    event_shape = torch.Size(velocity.event_shape)
    check_images("noise", noise, event_shape, flat=True)
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    n = noise.shape[0]
    patch = int(getattr(velocity, "patch_size", 1) or 1)
    tokens = event_shape[-2] * event_shape[-1] // patch**2 if len(event_shape) == 3 else event_shape[0]
    timesteps = set_pipeline_timesteps(
        scheduler, steps, pipeline=pipeline, image_seq_len=tokens, sigmas=sigmas, device=noise.device
    )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    cfg = guidance_scale > 1 and cond is not None  # diffusers' do_classifier_free_guidance
    if cfg:
        if negative_cond is None:
            both, drop = _cat_cond(cond, cond), torch.arange(2 * n, device=noise.device) < n
        else:
            both, drop = _cat_cond(negative_cond, cond), None
    x = noise.float()
    for i, timestep in enumerate(timesteps):
        t = scheduler.sigmas[i].to(noise.device, torch.float32).expand(n)
        if cfg:
            v = velocity(torch.cat([x, x]), torch.cat([t, t]), both, drop)[0]
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        else:
            v = velocity(x, t, cond)[0]
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


def _backbone_dtype(module: nn.Module | None) -> torch.dtype | None:
    for p in module.parameters() if module is not None else ():
        if p.is_floating_point():
            return p.dtype
    return None


class NTMDiffusersPipeline:
    r"""Text to image with an NTM in a diffusers model's latent space, and the FM baseline as diffusers runs it.

    ``pipe(prompts)``: prompts -> the pipeline's own text encoders (``encode_prompt``) -> ``steps`` NTM steps in
    latent space with the clipped Gaussian classifier-free guidance (:func:`trajflow.guidance.guided_gaussian`,
    weight ``guidance``; the null condition is the adapter's, fixed when the NTM was built) -> the VAE decoder
    in float32 (:class:`PipelineVAE`). ``pipe.flow_matching(prompts, steps=N)``: the same prompts through the
    flow-matching model ``velocity`` sampled by diffusers' ``FlowMatchEulerDiscreteScheduler`` as the diffusers
    pipeline does (:func:`scheduler_sample`: its timesteps, its shift, its CFG with the ``negative_prompt``),
    decoded by the same VAE.

    Noise. Both draw their initial latents :math:`x_1` first from ``generator`` as
    :meth:`prepare_latents` does (``randn((N, *event_shape))``, float32, on the pipeline's device), so the NTM
    and the FM baseline given generators of one seed start from the same latents; the NTM then draws one more
    Gaussian per step from the same generator. The same seed gives the same images.

    Precision. With ``autocast_dtype="auto"`` the NTM samples under autocast in the backbone's dtype when that is
    bfloat16 or float16 (load the transformer with ``torch_dtype=torch.bfloat16``; the NTM's own small parts
    may stay float32), else without autocast; the latents and the VAE are float32 throughout, and the images
    come back float32. The FM baseline runs without autocast, as diffusers does (the adapter casts the latents
    to the network's dtype and returns float32).

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
        if model is None and velocity is None:
            raise ValueError("model, velocity: expected an NTM, a flow-matching velocity model or both, got neither")
        if model is not None and not hasattr(model, "sample"):
            raise ValueError(f"model: expected a trajflow NTM, got {type(model).__name__}")
        if encode_prompt is not None and not callable(encode_prompt):
            raise ValueError(
                f"encode_prompt: expected a callable prompts -> condition, got {type(encode_prompt).__name__}"
            )
        if pipeline is not None and pipeline not in PIPELINE_ADAPTERS:
            raise ValueError(f"pipeline: expected None or one of {sorted(PIPELINE_ADAPTERS)}, got {pipeline!r}")
        if autocast_dtype not in ("auto", None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype: expected 'auto', None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
            )
        self.model = model
        self.velocity = velocity
        self.vae = vae if isinstance(vae, PipelineVAE) else PipelineVAE(vae)
        self.encode_prompt = encode_prompt
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.negative_prompt = negative_prompt
        self.autocast_dtype = autocast_dtype
        shapes = {tuple(m.event_shape) for m in (model, velocity) if m is not None}
        if len(shapes) != 1:
            raise ValueError(f"model, velocity: expected one latent shape, got {sorted(shapes)}")
        self.event_shape = torch.Size(shapes.pop())
        if len(self.event_shape) != 3 or self.event_shape[0] != self.vae.channels:
            raise ValueError(
                f"vae: the model's latents {tuple(self.event_shape)} do not fit the VAE's {self.vae.channels} latent "
                f"channels ({self.vae.layout} layout)"
            )

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

        Reads the pipeline's text encoders, tokenizers, VAE and scheduler (:func:`load_diffusers_pipeline`;
        ``model_index.json`` names the pipeline class, one of :data:`PIPELINE_ADAPTERS`), and the NTM ``model``
        (an NTM, or a folder written by its ``save_pretrained``, whose diffusers network is then cast to
        ``torch_dtype``: the NTM's own parts and the VAE stay float32). With ``teacher`` (default: when there is no
        ``model``) it also loads the pipeline's transformer through its adapter as the FM baseline's
        ``velocity``, with the encoded ``negative_prompt`` as its null condition and the latent size of
        ``resolution`` px (default: the transformer config's ``sample_size``, SD3 only).
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
            from ..model import NTM

            model = NTM.from_pretrained(model).eval()  # on the CPU: cast before it reaches the device
            backbone = getattr(getattr(model.predictor, "velocity", None), "model", None)
            if torch_dtype is not None and backbone is not None and _backbone_dtype(backbone) != torch_dtype:
                backbone.to(torch_dtype)  # the diffusers network; the transporter and the head stay float32
            model = model.to(device)
        velocity = None
        if teacher if teacher is not None else model is None:
            size = None
            if resolution is not None:
                h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
                size = list(vae.latent_shape(h, w)[1:])
            null = encoder([negative_prompt])
            velocity = PIPELINE_ADAPTERS[name].from_diffusers(
                folder, subfolder="transformer", torch_dtype=torch_dtype, sample_size=size, null_cond=null
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
        cond = self.encode_prompt(prompts)
        return _repeat_cond(_to(cond, self.device), num_images_per_prompt)

    def _condition(
        self, prompts: str | Sequence[str] | None, cond: Condition | None, num_images_per_prompt: int
    ) -> tuple[Condition | None, int | None]:
        if (
            not isinstance(num_images_per_prompt, int)
            or isinstance(num_images_per_prompt, bool)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt: expected a positive integer, got {num_images_per_prompt!r}")
        if (prompts is None) == (cond is None):
            raise ValueError("prompts, cond: expected exactly one of them (prompt strings or their embeddings)")
        if prompts is not None:
            cond = self.encode(prompts, num_images_per_prompt)
        else:
            cond = _repeat_cond(_to(cond, self.device), num_images_per_prompt)
        return cond, _cond_rows(cond)

    def _output(self, latents: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        images = self.vae.to_unit(self.vae.decode(latents))
        if output_type == "pt":
            return images
        from PIL import Image

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
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type: expected 'pt', 'pil' or 'latent', got {output_type!r}")
        cond, _ = self._condition(prompts, cond, num_images_per_prompt)
        from ..process import SAMPLE_T_MIN, time_grid

        grid = time_grid(steps, SAMPLE_T_MIN if t_min is None else t_min, shift, device=self.device)
        with self._autocast():
            if denoise:
                from ..denoise import sample_denoised

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
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type: expected 'pt', 'pil' or 'latent', got {output_type!r}")
        use_negative = prompts is not None and guidance_scale > 1 and self.encode_prompt is not None
        cond, n = self._condition(prompts, cond, num_images_per_prompt)
        if use_negative:
            negative_cond = self.encode([self.negative_prompt] * n)
        elif negative_cond is not None:
            negative_cond = _repeat_cond(_to(negative_cond, self.device), num_images_per_prompt)
        if latents is None:
            latents = self.prepare_latents(n, generator)
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


def _to(cond: Condition, device: torch.device) -> Condition:
    return tuple(c.to(device) for c in cond) if isinstance(cond, tuple) else cond.to(device)


__all__ += [
    "PIPELINE_ADAPTERS",
    "PromptEncoder",
    "load_diffusers_pipeline",
    "DiffusersPromptEncoder",
    "PipelineVAE",
    "set_pipeline_timesteps",
    "scheduler_sample",
    "NTMDiffusersPipeline",
]
