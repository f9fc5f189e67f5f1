r"""Velocity models from diffusers: a flow-matching ``UNet2DModel`` as a trajflow velocity model.

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

Each adapter (:class:`UNet2DVelocity` for ``UNet2DModel``) is a :class:`DiffusersVelocity`: it loads a
diffusers folder from disk only (:meth:`~DiffusersVelocity.from_diffusers`, ``local_files_only=True``,
nothing is fetched from a hub), writes one back (:meth:`~DiffusersVelocity.save_diffusers`), and saves with
trajflow's own :meth:`~trajflow.pretrained.Pretrained.save_pretrained` (the network's diffusers config in
``config.json``), also as a part of an NTM built on it by :func:`trajflow.finetune.init_from_flow_matching`
(import this module before ``NTM.from_pretrained`` reads such a folder: it registers the adapters' names).

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

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..checks import check_tensor, check_times
from ..conditioning import Condition
from ..nn.patches import check_images, patchify
from ..pretrained import Pretrained
from ..velocity import VelocityModel

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["DiffusersVelocity", "UNet2DVelocity"]

V = TypeVar("V", bound="DiffusersVelocity")


def _diffusers_class(name: str) -> type[nn.Module]:
    """The class ``diffusers.<name>``, importing diffusers now; an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"trajflow.contrib.diffusers: wrapping a {name} needs the diffusers package: pip install diffusers "
            "(or trajflow[vae]); models are read from local folders only, nothing is downloaded"
        ) from e
    return getattr(diffusers, name)


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
