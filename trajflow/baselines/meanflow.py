r"""MeanFlow: one- and few-step generation by regressing the average velocity over an interval.

The network predicts :math:`u(z_t, r, t) = \frac{1}{t - r} \int_r^t v(z_\tau, \tau) d\tau`, the average
velocity from :math:`t` down to :math:`r \le t`, so one step :math:`z_r = z_t - (t - r) u(z_t, r, t)` follows
the flow exactly. Differentiating :math:`(t - r) u = \int_r^t v` in :math:`t` gives the MeanFlow identity
:math:`u = v - (t - r) \frac{d}{dt} u`, whose right-hand side (total derivative along the flow, by one
forward-mode JVP, stop-gradient) is the regression target. At :math:`r = t` this is flow matching.

Here the network starts from a pretrained flow-matching teacher (:meth:`MeanFlowVelocity.from_velocity`),
and the interval :math:`t - r` enters through an extra, zero-initialised time embedding, so training starts
at :math:`u(z, r, t) = v(z, t)`.

References:
    | Mean Flows for One-step Generative Modeling (Geng et al., 2025). https://arxiv.org/abs/2505.13447
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..conditioning import Condition
from ..nn.config import DataclassPretrained
from ..nn.patches import unpatchify
from ..numerics import upcast
from ..predictors.transformer import TransformerBackbone, TransformerPredictorConfig
from ..velocity import TransformerVelocity
from .flow_matching import check_batch, descending_times, interpolate, noise_and_drop

__all__ = ["MeanFlowVelocity", "MeanFlowLoss", "meanflow_jvp", "meanflow_sample"]


class MeanFlowVelocity(DataclassPretrained, nn.Module):
    r"""The average velocity :math:`u(z_t, r, t, y)` on :class:`TransformerBackbone` with two times.

    The backbone embeds :math:`t` (first time MLP) and the interval :math:`t - r` (second time MLP, last
    Linear zero-initialised), so that a model built by :meth:`from_velocity` equals its teacher for every
    :math:`r`. ``forward(z, r, t, cond=None, drop_cond=None)`` returns ``u`` of ``z``'s shape (float32, or
    float64 for a float64 model); ``z`` is ``(N, C, H, W)``, ``r`` and ``t`` are ``(N,)`` with
    :math:`0 \le r \le t \le 1`.

    Arguments:
        config: A :class:`TransformerPredictorConfig` (``scale_bound`` is not used).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
        >>> teacher = TransformerVelocity(cfg)
        >>> model = MeanFlowVelocity.from_velocity(teacher)
        >>> z, t = torch.randn(3, 1, 4, 4), torch.rand(3)
        >>> torch.equal(model(z, 0.5 * t, t), teacher(z, t)[0])
        True
    """

    config_class = TransformerPredictorConfig

    def __init__(self, config: TransformerPredictorConfig) -> None:
        super().__init__()
        TransformerBackbone.attach(self, config, num_times=2, outputs=config.token_dim)  # times [t, t - r]
        interval_out = self.backbone.time_mlps[1][-1]
        nn.init.zeros_(interval_out.weight)  # the interval adds exactly 0 at init: u = v
        nn.init.zeros_(interval_out.bias)

    @property
    def validate_args(self) -> bool:
        """Whether inputs are checked by value (times in [0, 1]; the condition's values at the edges)."""
        return self.config.validate_args

    @classmethod
    def from_velocity(cls, velocity: TransformerVelocity) -> MeanFlowVelocity:
        """A copy of a pretrained flow-matching ``velocity`` (same device and dtype) with :math:`u = v`."""
        if not isinstance(velocity, TransformerVelocity):
            raise ValueError(f"velocity: expected a TransformerVelocity, got {type(velocity).__name__}")
        param = next(velocity.parameters())
        model = cls(velocity.config).to(device=param.device, dtype=param.dtype)
        missing, unexpected = model.load_state_dict(velocity.state_dict(), strict=False)
        # Only the interval MLP is new; it keeps its zero last layer.
        assert not unexpected and all(k.startswith("backbone.time_mlps.1.") for k in missing), (missing, unexpected)
        return model

    def _forward(
        self, z: Tensor, r: Tensor, t: Tensor, cond: Condition | None, drop_cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        self.backbone.check("z", z, r=r, t=t)
        if self.config.validate_args and bool((r > t).any()):
            raise ValueError(f"r: expected r <= t, got r - t up to {float((r - t).max()):.6g}")
        h = self.backbone(z, [t, t - r], cond, drop_cond)  # (N, L, width)
        u = unpatchify(self.head(h), self.config.patch_size, self.event_shape)
        return u.to(torch.promote_types(z.dtype, torch.float32)), h

    def forward(
        self, z: Tensor, r: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        """The average velocity ``u`` from ``t`` down to ``r``, of ``z``'s shape."""
        return self._forward(z, r, t, cond, drop_cond)[0]

    def velocity(
        self, z: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(u(z, t, t), hidden)``: the instantaneous velocity, as a velocity model returns it."""
        return self._forward(z, t, t, cond, drop_cond)


def meanflow_jvp(
    model: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    v: Tensor,
    cond: Condition | None = None,
    drop_cond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``(u, du/dt)``: :math:`u(z, r, t)` and its total derivative :math:`v \cdot \partial_z u + \partial_t u`.

    One :func:`torch.func.jvp` with tangents ``(v, 0, 1)``; ``u`` stays differentiable in the parameters.
    Attention runs on SDPA's math backend here: the fused CPU/CUDA kernels have no forward-mode derivative.

    Example:
        >>> f = lambda z, r, t, cond=None, drop=None: z * t[:, None]
        >>> u, dudt = meanflow_jvp(f, torch.ones(2, 3), torch.zeros(2), torch.ones(2), torch.ones(2, 3))
        >>> dudt  # d/dt (z t) with dz/dt = 1: t + z
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(
            lambda z_, r_, t_: model(z_, r_, t_, cond, drop_cond),
            (z, r, t),
            (v, torch.zeros_like(r), torch.ones_like(t)),
        )


@dataclass
class MeanFlowLoss:
    r"""MeanFlow's loss :math:`w \cdot \| u_\theta(z_t, r, t) - \mathrm{sg}(v - (t - r) \frac{d}{dt} u_\theta) \|^2`.

    Per example: :math:`t` and a second time are drawn from ``time_dist``; with probability ``ratio_r_neq_t``
    :math:`(r, t)` are their min and max, else :math:`r = t` (plain flow matching). The squared error is
    averaged over dims (the paper sums it: only the scale of :math:`c` differs); the adaptive weight
    :math:`w = \mathrm{sg}(1 / (\text{err} + c)^p)` is MeanFlow's (section 4.3). With
    ``time_dist="uniform"``, ``ratio_r_neq_t=0`` and ``adaptive_p=0`` it draws exactly what
    :class:`~trajflow.baselines.FlowMatchingLoss` draws and returns its loss (under the same SDPA backend).

    Arguments:
        ratio_r_neq_t: Fraction of examples with :math:`r \neq t` (0.25, the paper's best).
        time_dist: ``"logit_normal"`` (the paper's best, with ``logit_mean``, ``logit_std``) or ``"uniform"``.
        adaptive_p: The power :math:`p` of the adaptive weight (1.0, the paper's best; 0: plain MSE).
        adaptive_c: The constant :math:`c` of the adaptive weight.
        cond_drop: Probability of the null condition per example (for classifier-free guidance).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
        >>> model = MeanFlowVelocity(cfg)
        >>> MeanFlowLoss()(model, torch.randn(3, 1, 4, 4)).shape
        torch.Size([])
    """

    ratio_r_neq_t: float = 0.25
    time_dist: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    cond_drop: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t: expected a fraction in [0, 1], got {self.ratio_r_neq_t!r}")
        if self.time_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"time_dist: expected 'logit_normal' or 'uniform', got {self.time_dist!r}")
        if not self.adaptive_p >= 0 or not self.adaptive_c > 0:
            raise ValueError(
                f"(adaptive_p, adaptive_c): expected p >= 0 and c > 0, got ({self.adaptive_p}, {self.adaptive_c})"
            )

    def _times(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        if self.time_dist == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))

    def __call__(
        self, model: nn.Module, x0: Tensor, cond: Condition | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        check_batch(model, x0, cond)
        n, device = x0.shape[0], x0.device
        # Drawn in FlowMatchingLoss's order (t, eps, drop) so that r = t reproduces its draws exactly.
        t = self._times(n, device, generator)  # (N,)
        eps, drop = noise_and_drop(x0, cond, self.cond_drop, generator)
        r = t
        if self.ratio_r_neq_t > 0:
            other = self._times(n, device, generator)
            neq = torch.rand(n, device=device, generator=generator) < self.ratio_r_neq_t
            t, r = torch.where(neq, torch.maximum(t, other), t), torch.where(neq, torch.minimum(t, other), t)
        v = eps - x0
        u, dudt = meanflow_jvp(model, interpolate(x0, eps, t), r, t, v, cond, drop)
        h = (t - r).reshape(-1, *([1] * (x0.dim() - 1))).to(dudt.dtype)  # (N, 1, ...)
        target = (upcast(v) - h * upcast(dudt)).detach()  # stop-gradient
        sq = (upcast(u) - target).square()  # (N, *event)
        if self.adaptive_p == 0:
            return sq.mean()  # FlowMatchingLoss's reduction, so that r = t gives its loss bit for bit
        err = sq.flatten(1).mean(1)  # (N,)
        w = (err.detach() + self.adaptive_c).pow(-self.adaptive_p)
        return (w * err).mean()


@torch.no_grad()
def meanflow_sample(
    model: nn.Module, noise: Tensor, steps: int, *, cond: Condition | None = None, shift: float = 1.0
) -> Tensor:
    r"""MeanFlow sampling: :math:`z_r = z_t - (t - r) u(z_t, r, t)` from :math:`t = 1` to 0 (Geng et al., 2025,
    Algorithm 2, https://arxiv.org/abs/2505.13447), on the grid of :func:`~trajflow.time_grid`.

    Arguments:
        model: The average-velocity model, ``(z, r, t, cond) -> u``.
        noise: :math:`z_1 \sim \mathcal{N}(0, I)`, shape ``(N, *event)``.
        steps: Number of steps (network evaluations), e.g. 1, 2 or 4.
        cond: Flat condition ``(N, ...)`` or ``None``.
        shift: The time grid's shift (see :func:`trajflow.time_grid`).

    Example:
        >>> cfg = TransformerPredictorConfig((1, 4, 4), patch_size=2, width=16, depth=1, heads=2)
        >>> meanflow_sample(MeanFlowVelocity(cfg), torch.randn(2, 1, 4, 4), 1).shape
        torch.Size([2, 1, 4, 4])
    """
    ts = descending_times(model, noise, steps, cond, shift)  # (steps + 1,), 1 -> 0
    z, n = noise, noise.shape[0]
    for t, r in zip(ts[:-1], ts[1:]):
        z = z - (t - r) * model(z, r.expand(n), t.expand(n), cond)
    return z
