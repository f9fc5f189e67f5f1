r"""Discrete data: uniform dequantisation, bits per dimension with the data-range offset, and the dequantising
training objective (see :mod:`trajflow.likelihood` for the bound they give)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import accepts_keyword, check_count, check_tensor

__all__ = [
    "check_levels",
    "check_data_range",
    "bits_per_dim_offset",
    "check_discrete",
    "dequantize",
    "bits_per_dim",
    "DequantizedObjective",
]


def check_levels(levels: object) -> int:
    """Raise unless ``levels`` is an integer :math:`K \\geq 2` (the number of discrete values per dimension, e.g. 256
    for 8-bit data; a one-element integer tensor counts)."""
    return check_count("levels", levels, low=2)


def check_data_range(data_range: object, levels: int) -> tuple[float, float]:
    """Raise unless ``data_range`` is one of ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``; return it as floats.

    Other ranges are refused: data scaled some other way has almost certainly got the offset wrong."""
    allowed = ((-1.0, 1.0), (0.0, 1.0), (0.0, float(levels)))
    try:
        pair = tuple(float(v) for v in data_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pair = None
    if pair not in allowed:
        raise ValueError(f"data_range: expected one of (-1, 1), (0, 1) or (0, {levels}), got {data_range!r}")
    return pair  # type: ignore[return-value]


def bits_per_dim_offset(levels: int, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    r"""The offset :math:`\log_2(K / w)` added to :math:`-\log p_Y / (D \ln 2)` for a range of width :math:`w`
    (the log-volume per dimension of one integer's box, of side :math:`w / K`).

    Example:
        >>> bits_per_dim_offset(256), bits_per_dim_offset(256, (0, 1)), bits_per_dim_offset(256, (0, 256))
        (7.0, 8.0, 0.0)
    """
    levels = check_levels(levels)
    lo, hi = check_data_range(data_range, levels)
    return math.log2(levels / (hi - lo))


def check_discrete(name: str, x: Tensor, levels: int) -> Tensor:
    """Raise unless ``x`` holds integer values in ``[0, levels - 1]`` (an integer or a whole-valued float tensor).

    Rescaled data would make every bits/dim offset silently wrong, so the values are checked (one device sync).
    """
    check_tensor(name, x)
    levels = check_levels(levels)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected integer pixel values in [0, {levels - 1}], got dtype {x.dtype}")
    if x.numel() == 0:
        return x
    if x.is_floating_point():
        _check_whole(name, x, levels)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"{name}: expected integer values in [0, {levels - 1}], got values in [{lo:g}, {hi:g}]")
    return x


def _check_whole(name: str, x: Tensor, levels: int) -> None:
    """Raise unless the floats ``x`` are finite and whole."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite integer values in [0, {levels - 1}], got NaN/inf entries")
    if not bool((x == torch.round(x)).all()):
        raise ValueError(
            f"{name}: expected integer values in [0, {levels - 1}] (raw, not dequantised or rescaled data), "
            f"got floats with fractional parts"
        )


def dequantize(
    x_int: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Uniform dequantisation :math:`y = a + w (x + u) / K`, :math:`u \sim U[0, 1)^D`.

    :math:`y` covers the box of :math:`x` uniformly: computed in float64, then kept strictly below the box's
    upper edge in ``dtype`` (in float32, :math:`255 + u` rounds up to 256 for :math:`u > 1 - 2^{-17}`).
    ``trajflow.data.dequantize`` and ``trajflow.data.images.dequantize`` are this function.

    Arguments:
        x_int: Integer data in ``[0, levels - 1]``, any shape (e.g. uint8 images ``(N, C, H, W)``).
        levels: The number of values :math:`K` per dimension.
        generator: The random generator of :math:`u`, for reproducible evaluations.
        data_range: ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``.
        dtype: The floating dtype of the result.

    Example:
        >>> y = dequantize(torch.tensor([0, 255], dtype=torch.uint8), 256)
        >>> bool((y[0] >= -1) & (y[0] < -1 + 2 / 256)), bool((y[1] >= 1 - 2 / 256) & (y[1] < 1))
        (True, True)
    """
    levels = check_levels(levels)
    check_discrete("x_int", x_int, levels)
    lo, hi = check_data_range(data_range, levels)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
    x = x_int.to(torch.float64)
    u = torch.rand(x_int.shape, generator=generator, dtype=torch.float64, device=x_int.device)
    width = (hi - lo) / levels
    y = (lo + width * (x + u)).to(dtype)
    upper = (lo + width * (x + 1)).to(dtype)
    return torch.minimum(y, torch.nextafter(upper, torch.full_like(upper, -math.inf)))


def bits_per_dim(
    log_density_nats: Tensor, dims: int, levels: int, data_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    r"""Discrete bits/dim from a continuous log-density of dequantised data (an upper bound on the NLL).

    .. math:: \text{bpd} = -\frac{\log p_Y(y)}{D \ln 2} + \log_2 \frac{K}{w}

    with :math:`w` the width of ``data_range``: with a log-density averaged over dequantisation draws (or an
    ELBO), the bound of :mod:`trajflow.likelihood`.

    Arguments:
        log_density_nats: :math:`\log p_Y(y)` (or a lower bound on it) in nats, summed over the :math:`D`
            dimensions of each data point; any shape.
        dims: :math:`D`, the number of dimensions of one data point (``C * H * W``).
        levels: :math:`K`.
        data_range: The range the data was scaled to: ``(-1, 1)``, ``(0, 1)`` or ``(0, levels)``.

    Returns:
        Bits per dimension, same shape as ``log_density_nats``, in float64 (float32 would lose the small
        differences benchmarks compare to the offset's few bits).

    Example:
        >>> # the uniform density 2^-D on [-1, 1)^D: every one of the 256 values has probability 1/256
        >>> round(float(bits_per_dim(torch.tensor(-3 * math.log(2.0)), dims=3, levels=256)), 6)
        8.0
    """
    _check_log_density(log_density_nats)
    check_count("dims", dims)
    offset = bits_per_dim_offset(levels, data_range)
    return -log_density_nats.double() / (dims * math.log(2.0)) + offset


def _check_log_density(log_density_nats: Tensor) -> None:
    check_tensor("log_density_nats", log_density_nats)
    if not log_density_nats.is_floating_point():
        raise ValueError(f"log_density_nats: expected a floating-point tensor, got dtype {log_density_nats.dtype}")
    if bool(torch.isnan(log_density_nats).any()) or bool((log_density_nats == math.inf).any()):
        # -inf is a legitimate log-density (infinite bits); NaN or +inf are a broken model.
        raise ValueError("log_density_nats: expected values in [-inf, inf), got NaN or +inf entries")


@dataclass
class DequantizedObjective:
    """A :class:`~trajflow.train.Trainer` objective for discrete images: the loss on a fresh dequantisation.

    Each batch ``(images, labels)`` of integer images ``(N, C, H, W)`` in ``0..levels-1`` is dequantised into
    [-1, 1) (:func:`dequantize`, with the trainer's generator), then ``loss(model, y, generator=generator)``
    is returned, with ``step`` and ``progress`` added for a loss whose signature takes them (see
    :class:`~trajflow.train.Objective`). With an NLL in nats/dim (``TrajectoryNLL``, ``SingleFlowNLL``) this
    trains the density that :func:`elbo_bits_per_dim` and :func:`iwae_bits_per_dim` evaluate.

    Arguments:
        loss: ``(model, y, *, generator) -> scalar`` (or ``(scalar, logs)``): :class:`~trajflow.TrajectoryNLL`,
            :class:`~trajflow.baselines.SingleFlowNLL`, :class:`~trajflow.baselines.FlowMatchingLoss`, or one
            that also takes ``step`` / ``progress`` such as :class:`~trajflow.finetune.FinetuneLoss`.
        levels: The number of intensity levels of the images.
        loss_name: The loss's name in the trainer's logs.

    Example:
        >>> import trajflow
        >>> objective = DequantizedObjective(trajflow.TrajectoryNLL(steps=2), levels=17)
        >>> model = trajflow.NTM(trajflow.transporters.IdentityTransporter((4,)),
        ...                      trajflow.predictors.MLPPredictor(features=4))
        >>> images = torch.randint(0, 17, (8, 4))
        >>> objective(model, (images, torch.zeros(8)), torch.Generator().manual_seed(0), step=0).shape
        torch.Size([])
    """

    loss: Any
    levels: int
    loss_name: str = "nll_per_dim"

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels)
        if not callable(self.loss):
            raise ValueError(f"loss: expected a callable loss(model, y, *, generator), got {type(self.loss).__name__}")
        # Which schedule inputs the loss takes, read once: the NLLs take neither.
        self._schedule = tuple(name for name in ("step", "progress") if accepts_keyword(self.loss, name))

    def __call__(
        self,
        model: torch.nn.Module,
        batch: Any,
        generator: torch.Generator,
        step: int,
        *,
        progress: float | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        values = {"step": step, "progress": progress}
        extra = {name: values[name] for name in self._schedule if values[name] is not None}
        return self.loss(model, dequantize(images, self.levels, generator), generator=generator, **extra)
