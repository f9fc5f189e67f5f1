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
:meth:`~trajflow.pretrained.Pretrained.save_pretrained` (the network's diffusers config in ``config.json``),
also as a part of an NTM built on it by :func:`trajflow.finetune.init_from_flow_matching` (import this module
before ``NTM.from_pretrained`` reads such a folder: it registers the adapters' names).

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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..checks import check_tensor, check_times
from ..conditioning import Condition
from ..nn.patches import check_images, patchify, unpatchify
from ..pretrained import Pretrained
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
    :class:`~trajflow.predictors.transformer.TransformerVelocity` returns), ``(N, C', H, W)`` at full
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

    @property
    def unet(self) -> UNet2DModel:
        """The wrapped ``UNet2DModel``."""
        return self.model  # type: ignore[return-value]

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), **super().settings()}

    def check_cond(self, cond: Condition | None) -> torch.Size:
        """Validate ``cond`` (class labels ``(*batch,)``); return its batch shape (``()`` for None)."""
        if cond is None:
            return torch.Size()
        if self.num_classes is None:
            raise ValueError("cond: this UNet is unconditional (num_class_embeds=None), expected cond=None")
        check_tensor("cond", cond)
        if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
            raise ValueError(f"cond: expected integer class labels, got dtype {cond.dtype}")
        if self.validate_args and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
            raise ValueError(
                f"cond: expected class labels in 0..{self.num_classes - 1} (label {self.null_class} is the "
                f"reserved null class; use drop_cond), got values in {int(cond.min())}..{int(cond.max())}"
            )
        return cond.shape

    def _labels(self, cond: Condition | None, drop_cond: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """The UNet's ``class_labels`` ``(n,)``: ``cond`` with the null class where dropped (None: unconditional)."""
        if drop_cond is not None:
            check_tensor("drop_cond", drop_cond)
            if drop_cond.dtype != torch.bool or drop_cond.shape != (n,):
                raise ValueError(
                    f"drop_cond: expected a bool tensor of shape ({n},), got {drop_cond.dtype} of shape "
                    f"{tuple(drop_cond.shape)}"
                )
        batch = self.check_cond(cond)
        if self.null_class is None:
            return None
        null = torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if cond is None:
            return null
        if batch != (n,):
            raise ValueError(f"cond: expected one label per image, shape ({n},), got {tuple(batch)}")
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

    @property
    def _cond_form(self) -> str:
        return "(prompt_embeds (N, L, D), pooled_embeds (N, P))" if self.pooled else "prompt_embeds (N, L, D)"

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

    def check_cond(self, cond: Condition | None) -> torch.Size:
        """Validate ``cond`` (shapes and dtypes only: no device synchronisation); return its batch shape.

        ``cond=None`` is the null condition: allowed only when one was given at construction (``null_cond``).
        """
        if cond is None:
            if self.null_prompt_embeds is None:
                raise ValueError(
                    f"cond: this {self.diffusers_class} is text-conditional, expected {self._cond_form}, got None "
                    "(for unconditional calls pass null_cond=... at construction, e.g. the empty prompt's embeddings)"
                )
            return torch.Size()
        if self.pooled:
            if not isinstance(cond, tuple) or len(cond) != 2 or not all(isinstance(c, Tensor) for c in cond):
                raise ValueError(f"cond: expected a pair {self._cond_form}, got {type(cond).__name__}")
            prompt, pooled = cond
        else:
            if not isinstance(cond, Tensor):
                raise ValueError(f"cond: expected a tensor {self._cond_form}, got {type(cond).__name__}")
            prompt, pooled = cond, None
        if prompt.dim() < 3 or prompt.shape[-1] != self.text_features or not prompt.is_floating_point():
            raise ValueError(
                f"cond: expected prompt embeddings (N, L, {self.text_features}) (the network's joint_attention_dim), "
                f"got {prompt.dtype} of shape {tuple(prompt.shape)}"
            )
        if pooled is not None:
            if not pooled.is_floating_point():
                raise ValueError(
                    f"cond: expected floating-point pooled embeddings (N, {self.pooled_features}) as the second part, "
                    f"got {pooled.dtype} (this network takes no attention mask)"
                )
            if pooled.dim() < 2 or pooled.shape[-1] != self.pooled_features:
                raise ValueError(
                    f"cond: expected pooled embeddings (N, {self.pooled_features}) (the network's "
                    f"pooled_projection_dim), got shape {tuple(pooled.shape)}"
                )
            if pooled.shape[:-1] != prompt.shape[:-2]:
                raise ValueError(
                    f"cond: the prompt embeddings {tuple(prompt.shape)} and the pooled embeddings "
                    f"{tuple(pooled.shape)} disagree on the batch shape"
                )
        return torch.Size(prompt.shape[:-2])

    def _text(self, cond: Condition | None, drop_cond: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
        """The network's ``(prompt_embeds (n, L, D), pooled (n, P) or None)``, null rows where dropped."""
        if drop_cond is not None:
            check_tensor("drop_cond", drop_cond)
            if drop_cond.dtype != torch.bool or drop_cond.shape != (n,):
                raise ValueError(
                    f"drop_cond: expected a bool tensor of shape ({n},), got {drop_cond.dtype} of shape "
                    f"{tuple(drop_cond.shape)}"
                )
        batch = self.check_cond(cond)
        if cond is None:  # the null condition everywhere (check_cond made sure there is one)
            prompt = self.null_prompt_embeds.expand(n, -1, -1)
            pooled = None if self.null_pooled_embeds is None else self.null_pooled_embeds.expand(n, -1)
            return prompt, pooled
        if batch != (n,):
            raise ValueError(f"cond: expected one condition per latent, batch shape ({n},), got {tuple(batch)}")
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


class FluxVelocity(_TextTransformerVelocity):
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

    @property
    def transformer(self) -> nn.Module:
        """The wrapped ``FluxTransformer2DModel``."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), "guidance": self.guidance, **super().settings()}

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n = x.shape[0]
        tokens = patchify(x, 2)  # == FluxPipeline._pack_latents: (N, C, H, W) -> (N, H W / 4, 4 C)
        guidance = None
        if self.guidance is not None:  # FluxPipeline.__call__: torch.full([1], guidance_scale).expand(N), float32
            guidance = torch.full((n,), self.guidance, device=x.device, dtype=torch.float32)
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


class Flux2Velocity(_TextTransformerVelocity):
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

    @property
    def transformer(self) -> nn.Module:
        """The wrapped ``Flux2Transformer2DModel``."""
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"sample_size": list(self.sample_size), "guidance": self.guidance, **super().settings()}

    def _velocity(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor | None) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)  # == Flux2KleinPipeline._pack_latents
        # Flux2KleinPipeline._prepare_text_ids: cartesian_prod(t=[0], h=[0], w=[0], l) -> (L, 4)
        zero = torch.zeros(1, dtype=torch.long)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(prompt.shape[1])).to(x.device)
        guidance = None
        if self.guidance is not None:  # Flux2Pipeline.__call__: torch.full([1], guidance_scale).expand(N)
            guidance = torch.full((n,), self.guidance, device=x.device, dtype=torch.float32)
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
