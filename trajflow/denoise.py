r"""Trajectory score denoising and the learned one-pass denoiser ("self-distillation").

**Trajectory score denoising** (NTM Eq. 3.5, Algorithm 3). A generated trajectory
:math:`\hat x = (\hat x_{t_0}, \dots, \hat x_{t_T})` is a noisy Markov sequence whose noise given
:math:`x_0` is Gaussian with covariance :math:`S \otimes I` (:meth:`trajflow.MarkovInterpolant.covariance`).
Tweedie's formula for correlated Gaussian noise gives

.. math:: \mathbb{E}[x_0 | \hat x] = \frac{\hat x_i + \sum_j S_{ij} \nabla_{\hat x_j} \log p(\hat x)}{1 - t_i}
          \quad \text{for every level } i < T,

and an NTM gives :math:`\nabla \log p` of the *whole trajectory* exactly, by autograd through its NLL.
:func:`trajectory_score_denoise` returns the :math:`t_0` component. For the true density all levels give
the same answer, :math:`\mathbb{E}[x_0 | x_{t_0}]` (the chain is Markov), which the tests check on
Gaussian data.

**Learned denoiser** (NTM §3.4, method.md 5.2). A network :math:`g_\phi(u_{t_0}, y) \to x_0` regresses
the score-denoised targets of the frozen NTM on *real-data* trajectories (:class:`DistillationLoss`).
Sampling then skips the transporter's token-by-token inverse and the backward pass
(:func:`fast_sample`): the predictor runs :math:`T` times, then :math:`g_\phi` once.

Under classifier-free guidance the score is that of the **conditional** model (the guided chain is only
used to generate; STARFlow's code does the same), see :func:`trajectory_score_denoise`.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.2 (Eq. 3.5), §3.4, App. A.6, C.3, Algorithms 2-3.
    | https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    Pretrained,
    check_config,
    dataclass_from_dict,
    load_json,
    load_model_weights,
    read_pretrained_config,
)
from .checks import check_event_shape, check_finite
from .conditioning import Condition, EventDims, align_cond, cond_batch_shape
from .distribution import TrajectoryDistribution
from .losses import guidance_dropout
from .model import NTM
from .predictors.transformer import TransformerPredictorConfig, TransformerVelocity
from .process import SAMPLE_T_MIN, MarkovInterpolant, sample_t_min, time_grid
from .velocity import MLPVelocity

__all__ = [
    "trajectory_score_denoise",
    "sample_denoised",
    "LearnedDenoiser",
    "MLPDenoiserConfig",
    "MLPDenoiser",
    "TransformerDenoiser",
    "DistillationLoss",
    "fast_sample",
    "save_denoiser",
    "load_denoiser",
]


# -- trajectory score denoising ---------------------------------------------------------------------------------


def _conditional(dist: TrajectoryDistribution) -> TrajectoryDistribution:
    """The same distribution without guidance (the conditional model), for the score."""
    if dist.guidance == 0:
        return dist
    return TrajectoryDistribution(
        dist.transporter, dist.predictor, dist.grid, dist.cond, drop_cond=dist.drop_cond, validate_args=False
    )


def _clip_percentile(g: Tensor, percentile: float, level: int) -> Tensor:
    """Clip ``g`` ``(*lead, T + 1, *data)`` elementwise at the ``percentile``-th percentile of ``|g|`` per
    trajectory."""
    flat = g.abs().flatten(level)  # (*lead, (T + 1) D)
    k = max(1, min(flat.shape[-1], math.ceil(percentile / 100.0 * flat.shape[-1])))
    q = flat.kthvalue(k, dim=-1).values  # (*lead,)
    q = q.reshape(*q.shape, *([1] * (g.dim() - level)))
    return torch.maximum(torch.minimum(g, q), -q)


def trajectory_score_denoise(
    dist: TrajectoryDistribution,
    traj: Tensor,
    *,
    clip_percentile: float | None = None,
    return_trajectory: bool = False,
) -> Tensor:
    r"""Denoise a trajectory with its own exact score (NTM Eq. 3.5, Algorithm 3).

    1. Enable gradients on the trajectory :math:`\hat x` (every level, in data space).
    2. :math:`g = \nabla_{\hat x} (-\log p(\hat x))` by autograd through the NTM's NLL; optionally clip
       :math:`g` elementwise at the ``clip_percentile``-th percentile of :math:`|g|` of each trajectory.
    3. :math:`\hat x^{den}_i = (\hat x_i - \sum_j S_{ij} g_j) / (1 - t_i)` per level :math:`i < T`, with
       :math:`S` = :meth:`~trajflow.MarkovInterpolant.covariance` of the grid (mixing levels, per element).

    With guidance (``dist.guidance > 0``) the score is the conditional model's, not the guided one's.
    The model's parameters are not updated and get no ``.grad``. Needs :math:`t_0 > 0` to change anything:
    row 0 of :math:`S` vanishes at :math:`t_0 = 0`.

    Arguments:
        dist: The NTM's trajectory distribution (grid, condition).
        traj: Trajectories in data space, ``(*lead, T + 1, *data)``, e.g. ``dist.decode(latents)``.
        clip_percentile: Percentile in (0, 100] for clipping the gradient, or ``None``.
        return_trajectory: Also return the estimate of every level ``i < T``.

    Returns:
        :math:`\hat x_0` of shape ``(*lead, *data)``, detached; with ``return_trajectory``, the estimates of
        all levels below :math:`T`, ``(*lead, T, *data)`` (index 0 is the same :math:`\hat x_0`).
    """
    check_event_shape("traj", traj, dist.event_shape, "(T + 1, *data)")
    check_finite("traj", traj)
    if clip_percentile is not None and not 0 < clip_percentile <= 100:
        raise ValueError(f"clip_percentile: expected a percentile in (0, 100] or None, got {clip_percentile!r}")
    dd = len(dist.data_shape)
    level = traj.dim() - dd - 1
    T = dist.steps
    cdist = _conditional(dist)
    with torch.enable_grad():
        x = traj.detach().requires_grad_(True)
        nll = -cdist.log_prob(x).sum()  # examples are independent: the sum's gradient is per example
        (g,) = torch.autograd.grad(nll, x)  # (*lead, T + 1, *data)
    if clip_percentile is not None:
        g = _clip_percentile(g, clip_percentile, level)
    grid = dist.grid.to(traj.device)
    S = MarkovInterpolant.covariance(grid).to(g.dtype)  # (*gb, T + 1, T + 1)
    lead = traj.shape[:level]
    sg = (S @ g.flatten(level + 1)).reshape(g.shape)  # (*lead, T + 1, *data): (S g)_i = sum_j S_ij g_j
    t = grid[..., :T].to(g.dtype)  # (*gb, T)
    t = t.reshape(*t.shape, *([1] * dd))
    x_den = (traj.detach().narrow(level, 0, T) - sg.narrow(level, 0, T)) / (1 - t)  # (*lead, T, *data)
    x_den = x_den.expand(*lead, T, *dist.data_shape)
    if return_trajectory:
        return x_den
    return x_den.select(level, 0)


@torch.no_grad()
def sample_denoised(
    dist: TrajectoryDistribution,
    sample_shape: torch.Size | tuple[int, ...] = (),
    *,
    clip_percentile: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The full sampling path (NTM Algorithm 2 with step 4 = Algorithm 3).

    1-2. Run the predictor :math:`T` times in transporter space (``dist.rsample_latents``).
    3. Invert the transporter at **every** level below :math:`T`, batched across levels (``dist.decode``;
       the KV-cached token-by-token inverse for the transformer transporter).
    4. Denoise with the trajectory's score (:func:`trajectory_score_denoise`).

    ``generator`` (a :class:`torch.Generator` on the model's device) draws all the noise; ``None`` uses
    torch's global generator.

    Returns:
        :math:`\hat x_0`, shape ``(*sample_shape, *batch_shape, *data)``.
    """
    latents, _ = dist.rsample_latents(sample_shape, generator=generator)
    traj = dist.decode(latents)
    return trajectory_score_denoise(dist, traj, clip_percentile=clip_percentile)


# -- learned denoisers ------------------------------------------------------------------------------------------


class LearnedDenoiser(Pretrained, nn.Module, ABC):
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
    config: Any
    #: The dataclass of :attr:`config`.
    config_class: ClassVar[type]

    def config_dict(self) -> dict[str, Any]:
        """The fields of :attr:`config`."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearnedDenoiser:
        config_class = getattr(cls, "config_class", None)
        if config_class is None:
            raise NotImplementedError(f"{cls.__name__}: set config_class (the dataclass of its config)")
        return cls(dataclass_from_dict(config_class, config, "config"))  # type: ignore[call-arg]

    @abstractmethod
    def forward(
        self, u: Tensor, t0: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor: ...

    def check_cond(self, cond: Condition | None) -> torch.Size:
        """Validate ``cond``; return its batch shape (``()`` for None)."""
        if cond is None:
            return torch.Size()
        if self.cond_event_dims is None:
            raise ValueError("cond: this denoiser is unconditional, expected cond=None")
        return cond_batch_shape(cond, self.cond_event_dims)


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
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")


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
        self.net = MLPVelocity(
            config.features,
            num_classes=config.num_classes,
            cond_features=config.cond_features,
            width=config.width,
            depth=config.depth,
            time_features=config.time_features,
        )
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)
        self.event_shape = self.net.event_shape
        self.cond_event_dims = self.net.cond_event_dims

    def check_cond(self, cond: Condition | None) -> torch.Size:
        batch = super().check_cond(cond)
        if cond is not None:
            self.net.condition.check(cond)  # type: ignore[arg-type]
        return batch

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
        self.net = TransformerVelocity(config)  # zero-initialised head: g starts as the identity
        self.event_shape = self.net.event_shape
        self.cond_event_dims = self.net.cond_event_dims

    def check_cond(self, cond: Condition | None) -> torch.Size:
        return self.net.check_cond(cond)

    def forward(self, u: Tensor, t0: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """``u`` ``(N, C, H, W)``, ``t0`` ``(N,)`` -> :math:`\\hat x_0` ``(N, C, H, W)``."""
        delta, _ = self.net(u, t0, cond, drop_cond)  # checks shapes, times and the condition
        return u + delta.to(u.dtype)


# -- distillation ----------------------------------------------------------------------------------------------


@dataclass
class DistillationLoss:
    r"""Self-distillation of a learned denoiser from the frozen NTM's trajectory score (NTM §3.4).

    For real data :math:`x_0` (method.md 5.2): draw :math:`t_{\min}` and the grid, the forward trajectory
    :math:`x_{t_0..t_T}`, :math:`u_{t_0} = f_T(x_{t_0}, t_0)`, and the target
    :math:`\hat x_0^{den}` = :func:`trajectory_score_denoise` of that trajectory under the teacher; the
    loss is :math:`\| g_\phi(u_{t_0}, t_0, y) - \hat x_0^{den} \|^2` averaged over dimensions.

    Arguments:
        teacher: The trained NTM. It is not updated; freeze it (``requires_grad_(False)``) so that it
            gets no gradients at all.
        steps: :math:`T` of the grids (train at the :math:`T` used for sampling).
        t_min: Range of :math:`t_0`; the default is the sampling value
            :data:`~trajflow.process.SAMPLE_T_MIN` = 0.02 (at :math:`t_0 = 0` the target is :math:`x_0` itself
            and the score plays no part).
        shift: The grid's shift (see :func:`trajflow.time_grid`).
        cond_drop: Probability of the null condition per example (teacher and student alike), so the
            denoiser also serves unconditional sampling.
        clip_percentile: Gradient clipping of :func:`trajectory_score_denoise`.
    """

    teacher: NTM
    steps: int = 4
    t_min: tuple[float, float] = (SAMPLE_T_MIN, SAMPLE_T_MIN)
    shift: float = 1.0
    cond_drop: float = 0.1
    clip_percentile: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, NTM):
            raise ValueError(f"teacher: expected an NTM, got {type(self.teacher).__name__}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        lo, hi = self.t_min
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"t_min: expected a range 0 <= low <= high < 1, got {self.t_min}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop: expected a probability in [0, 1), got {self.cond_drop}")

    def targets(
        self, x0: Tensor, cond: Condition | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(u0, t0, target, drop)``: the student's inputs ``(B, *data)``, ``(B,)``, the detached targets
        ``(B, *data)`` and the condition-dropout mask (``None`` or ``(B,)``)."""
        teacher = self.teacher
        event = teacher.event_shape
        check_event_shape("x0", x0, event)
        if x0.dim() != len(event) + 1:
            raise ValueError(f"x0: expected shape (batch, {', '.join(map(str, event))}), got {tuple(x0.shape)}")
        check_finite("x0", x0)
        n, device = x0.shape[0], x0.device
        if cond is not None and teacher.predictor.check_cond(cond) != x0.shape[:1]:
            raise ValueError(f"cond: expected batch shape {tuple(x0.shape[:1])} to match x0")
        t0 = sample_t_min((n,), *self.t_min, generator=generator, device=device)
        grid = time_grid(self.steps, t0, self.shift, device=device)  # (B, T + 1)
        drop = guidance_dropout(n, self.cond_drop if cond is not None else 0.0, device, generator)
        traj = MarkovInterpolant(event_dim=len(event)).sample(x0, grid, generator=generator)  # (B, T + 1, *data)
        dist = teacher.distribution(grid, cond, drop_cond=drop, validate_args=False)
        target = trajectory_score_denoise(dist, traj, clip_percentile=self.clip_percentile)
        with torch.no_grad():
            u0, _ = dist._transport(traj[:, 0], t0)  # with the condition, if the transporter sees it
        return u0.detach(), t0, target.detach(), drop

    def __call__(
        self,
        denoiser: LearnedDenoiser,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if torch.Size(denoiser.event_shape) != self.teacher.event_shape:
            raise ValueError(
                f"denoiser: its event shape {tuple(denoiser.event_shape)} differs from the teacher's "
                f"{tuple(self.teacher.event_shape)}"
            )
        u0, t0, target, drop = self.targets(x0, cond, generator=generator)
        pred = denoiser(u0, t0, cond, drop)
        return (pred.float() - target.float()).square().mean()


@torch.no_grad()
def fast_sample(
    model: NTM,
    denoiser: LearnedDenoiser,
    sample_shape: torch.Size | tuple[int, ...] = (),
    *,
    cond: Condition | None = None,
    steps: int = 4,
    t_min: float = SAMPLE_T_MIN,
    shift: float = 1.0,
    grid: Tensor | None = None,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The fast sampling path (NTM Algorithm 2 with step 4 = the learned denoiser, §3.4).

    1-2. Run the predictor :math:`T` times in transporter space (with classifier-free guidance if
         ``guidance > 0``) to :math:`\hat u_{t_0}`.
    4. :math:`\hat x_0 = g_\phi(\hat u_{t_0}, t_0, y)` (conditional, no dropout). The transporter's inverse
       (step 3) is skipped entirely.

    Arguments:
        model: The NTM.
        denoiser: The learned denoiser (trained at the same ``t_min`` and ``steps``).
        sample_shape: Samples per condition, on the left of the condition's batch shape.
        cond, steps, t_min, shift, grid, guidance, generator: As in :meth:`trajflow.NTM.sample`.

    Returns:
        :math:`\hat x_0`, ``(*sample_shape, *batch_shape, *data)``.
    """
    if torch.Size(denoiser.event_shape) != model.event_shape:
        raise ValueError(
            f"denoiser: its event shape {tuple(denoiser.event_shape)} differs from the model's "
            f"{tuple(model.event_shape)}"
        )
    if grid is None:
        grid = time_grid(steps, t_min, shift, device=model.device)
    dist = model.distribution(grid, cond, guidance=guidance)
    latents, _ = dist.rsample_latents(sample_shape, generator=generator)  # (*lead, T + 1, *data)
    dd = len(model.event_shape)
    level = latents.dim() - dd - 1
    lead = latents.shape[:level]
    u0 = latents.select(level, 0).reshape(-1, *model.event_shape)  # (N, *data)
    t0 = dist.grid[..., 0].expand(lead).reshape(-1)  # (N,)
    flat_cond = None
    if cond is not None:
        if denoiser.cond_event_dims is None:
            raise ValueError("cond: the denoiser is unconditional, expected cond=None")
        flat_cond = align_cond(cond, denoiser.cond_event_dims, lead)
    x0 = denoiser(u0.to(next(denoiser.parameters()).dtype), t0, flat_cond, None)
    return x0.reshape(*lead, *model.event_shape)


# -- checkpoints ------------------------------------------------------------------------------------------------


def save_denoiser(denoiser: LearnedDenoiser, directory: str | os.PathLike) -> Path:
    """``denoiser.save_pretrained(directory)``: ``config.json`` and ``model.safetensors`` (kept for callers)."""
    if not isinstance(denoiser, LearnedDenoiser):
        raise ValueError(f"denoiser: expected a LearnedDenoiser, got {type(denoiser).__name__}")
    return denoiser.save_pretrained(directory)


def load_denoiser(directory: str | os.PathLike, *, into: LearnedDenoiser | None = None) -> LearnedDenoiser:
    """Load a denoiser saved by :meth:`~trajflow.checkpoint.Pretrained.save_pretrained` (or :func:`save_denoiser`).

    Folders written before the pretrained format (``config.json`` without ``"format"``) load too.

    Arguments:
        directory: The folder.
        into: An existing denoiser to load the weights into (it keeps its device). Its class and config must
            match the folder's; otherwise a :class:`ValueError` names the classes or every differing field.
            ``None`` builds a new denoiser of the saved class (``LearnedDenoiser.from_pretrained``).
    """
    path = Path(directory)
    legacy = _legacy_record(path)
    if into is None:
        if legacy is None:
            return LearnedDenoiser.from_pretrained(path)
        into = _denoiser_classes()[legacy["class"]].from_config(legacy["config"])
    else:
        record = legacy if legacy is not None else read_pretrained_config(path)
        if record["class"] != type(into).__name__:
            raise ValueError(f"into: {str(path)!r} holds a pretrained {record['class']}, not a {type(into).__name__}")
        check_config(into.config_dict(), record["config"], source=f"the pretrained folder {str(path)!r}")
    load_model_weights(path, into)  # safetensors: raw tensors only, nothing unpickled
    return into


def _denoiser_classes() -> dict[str, type[LearnedDenoiser]]:
    return {c.__name__: c for c in (MLPDenoiser, TransformerDenoiser)}


def _legacy_record(path: Path) -> dict[str, Any] | None:
    """The ``{"class", "config"}`` of a folder written by the old ``save_denoiser`` (no ``"format"``), else None."""
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        return None  # read_pretrained_config says what is missing
    record = load_json(path / CONFIG_FILE)
    if isinstance(record, dict) and "format" not in record and record.get("class") in _denoiser_classes():
        return record
    return None
