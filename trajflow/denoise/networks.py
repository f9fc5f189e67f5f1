r"""Learned denoisers :math:`g_\phi(u_{t_0}, t_0, y) \to x_0` (NTM §3.4): the base class, a residual MLP for
vectors and a non-causal transformer for images, each saved and rebuilt as a pretrained folder
(:func:`save_denoiser`, :func:`load_denoiser`)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import (
    check_config,
    load_model_weights,
    read_pretrained_config,
)
from ..checks import check_count, check_event_shape
from ..conditioning import Condition, CondSpec, EventDims
from ..nn.config import DataclassPretrained
from ..predictors.transformer import TransformerPredictorConfig
from ..velocity import MLPVelocity, TransformerVelocity

__all__ = [
    "LearnedDenoiser",
    "MLPDenoiserConfig",
    "MLPDenoiser",
    "TransformerDenoiser",
    "save_denoiser",
    "load_denoiser",
]


class LearnedDenoiser(DataclassPretrained, nn.Module, ABC):
    r"""Base class of learned denoisers :math:`g_\phi(u_{t_0}, t_0, y) \to x_0`.

    Calls are flat: ``u`` ``(N, *event_shape)`` (the cleanest latent of the predictor chain), ``t0``
    ``(N,)``, ``cond`` ``None`` or a flat condition, ``drop_cond`` ``None`` or ``(N,)`` bool. The output
    has ``u``'s shape. Subclasses hold their hyper-parameters in a dataclass ``config`` of class
    :attr:`config_class`, which is what :meth:`save_pretrained` writes;
    ``LearnedDenoiser.from_pretrained(dir)`` rebuilds whichever denoiser class wrote ``dir``.

    Example:
        >>> import tempfile
        >>> g = MLPDenoiser(MLPDenoiserConfig(features=2, width=8, depth=1))
        >>> again = LearnedDenoiser.from_pretrained(g.save_pretrained(tempfile.mkdtemp()))
        >>> type(again).__name__, again.config == g.config
        ('MLPDenoiser', True)
    """

    event_shape: torch.Size
    cond_event_dims: EventDims | None = None
    cond_spec: CondSpec | None = None

    def _set_net(self, net: nn.Module) -> None:
        """The network of the residual :math:`g - u`, whose shapes and condition the denoiser takes."""
        self.net = net
        self.event_shape = net.event_shape
        self.cond_spec = net.cond_spec
        self.cond_event_dims = net.cond_event_dims

    @abstractmethod
    def forward(
        self, u: Tensor, t0: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor: ...


@dataclass
class MLPDenoiserConfig:
    """Hyper-parameters of :class:`MLPDenoiser` (the fields of :class:`~trajflow.predictors.MLPPredictor`)."""

    features: int
    num_classes: int | None = None
    cond_features: int = 0
    width: int = 256
    depth: int = 3
    time_features: int = 64

    def __post_init__(self) -> None:
        for name in ("features", "width", "depth"):
            check_count(name, getattr(self, name))


class MLPDenoiser(LearnedDenoiser):
    r"""A residual-MLP denoiser for vectors: :math:`g(u, t_0, y) = u + \mathrm{head}(h)`, head zero-initialised.

    Example:
        >>> g = MLPDenoiser(MLPDenoiserConfig(features=2, width=32))
        >>> g(torch.randn(5, 2), torch.full((5,), 0.02)).shape
        torch.Size([5, 2])
    """

    config_class = MLPDenoiserConfig

    def __init__(self, config: MLPDenoiserConfig) -> None:
        super().__init__()
        self.config = config
        # The same network as the flow-matching baseline, read as a residual x0 - u; zero-initialised so
        # that g starts as the identity.
        self._set_net(MLPVelocity(**asdict(config)))
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)

    def forward(self, u: Tensor, t0: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """``u`` ``(N, features)``, ``t0`` ``(N,)`` -> :math:`\\hat x_0` ``(N, features)``."""
        check_event_shape("u", u, self.event_shape)
        delta, _ = self.net(u, t0, cond, drop_cond)  # type: ignore[arg-type]
        return u + delta


class TransformerDenoiser(LearnedDenoiser):
    r"""A non-causal transformer denoiser for images (NTM §3.4): full attention over patch tokens, 2-D RoPE.

    Reuses :class:`~trajflow.predictors.transformer.TransformerBackbone` (one embedded time, :math:`t_0`;
    class or text tokens prefixed to the sequence, as in the predictor) with a zero-initialised head, so
    :math:`g(u) = u` at initialisation. NTM does not give its size; 8 layers at the model width is
    STARFlow-V's choice for its learnable denoiser (method.md §8).

    Arguments:
        config: A :class:`~trajflow.predictors.transformer.TransformerPredictorConfig` (``scale_bound`` unused).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
        >>> TransformerDenoiser(cfg)(torch.randn(3, 1, 4, 4), torch.full((3,), 0.02)).shape
        torch.Size([3, 1, 4, 4])
    """

    config_class = TransformerPredictorConfig

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        self.config = config
        self._set_net(TransformerVelocity(config))  # zero-initialised head: g starts as the identity

    def forward(self, u: Tensor, t0: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """``u`` ``(N, C, H, W)``, ``t0`` ``(N,)`` -> :math:`\\hat x_0` ``(N, C, H, W)``."""
        delta, _ = self.net(u, t0, cond, drop_cond)  # checks shapes, times and the condition
        return u + delta.to(u.dtype)


def save_denoiser(denoiser: LearnedDenoiser, directory: str | os.PathLike) -> Path:
    """``denoiser.save_pretrained(directory)``: ``config.json`` and ``model.safetensors`` (kept for callers)."""
    if not isinstance(denoiser, LearnedDenoiser):
        raise ValueError(f"denoiser: expected a LearnedDenoiser, got {type(denoiser).__name__}")
    return denoiser.save_pretrained(directory)


def load_denoiser(directory: str | os.PathLike, *, into: LearnedDenoiser | None = None) -> LearnedDenoiser:
    """Load a denoiser saved by :meth:`~trajflow.checkpoint.Pretrained.save_pretrained` (or :func:`save_denoiser`).

    Arguments:
        directory: The folder.
        into: An existing denoiser to load the weights into (it keeps its device). Its class and config must
            match the folder's; otherwise a :class:`ValueError` names the classes or every differing field.
            ``None`` builds a new denoiser of the saved class (``LearnedDenoiser.from_pretrained``).
    """
    if into is None:
        return LearnedDenoiser.from_pretrained(directory)
    path = Path(directory)
    record = read_pretrained_config(path)
    if record["class"] != type(into).__name__:
        raise ValueError(f"into: {str(path)!r} holds a pretrained {record['class']}, not a {type(into).__name__}")
    check_config(into.config_dict(), record["config"], source=f"the pretrained folder {str(path)!r}")
    load_model_weights(path, into)  # safetensors: raw tensors only, nothing unpickled
    return into
