r"""Flow matching on the same backbones: the baseline of every benchmark (training loss and ODE samplers).

A velocity model :math:`v_\theta(x_t, t, y)` regresses :math:`\epsilon - x_0` on :math:`x_t = (1 - t) x_0 + t
\epsilon` (rectified flow), and samples by integrating :math:`dx/dt = v` from :math:`t = 1` (noise) to 0 (data).
Integrated the other way with the divergence of :math:`v`, the same ODE gives the model's exact log-density
(:func:`flow_matching_log_prob`, :func:`flow_matching_bits_per_dim`).

References:
    | Flow Matching for Generative Modeling (Lipman et al., 2023). https://arxiv.org/abs/2210.02747
    | Flow Straight and Fast (Liu et al., 2023). https://arxiv.org/abs/2209.03003
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022),
    | Algorithm 1 (Heun's second-order sampler). https://arxiv.org/abs/2206.00364
    | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models (Grathwohl et al.,
    | 2019). https://arxiv.org/abs/1810.01367
    | Score-Based Generative Modeling through Stochastic Differential Equations (Song et al., 2021),
    | Appendix D.2. https://arxiv.org/abs/2011.13456
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_count, check_event_shape, check_finite
from ..conditioning import Condition, check_cond
from ..likelihood import flow_bits_per_dim
from ..losses import guidance_dropout
from ..numerics import upcast
from ..process import time_grid
from ..velocity import MLPVelocity, VelocityModel, guided_velocity

__all__ = [
    "VelocityModel",
    "MLPVelocity",
    "FlowMatchingLoss",
    "euler_sample",
    "heun_sample",
    "guided_velocity",
    "SOLVERS",
    "DIVERGENCES",
    "flow_matching_log_prob",
    "flow_matching_bits_per_dim",
]

#: The fixed-step solvers of :func:`flow_matching_log_prob` (1, 2 and 4 network evaluations per step).
SOLVERS = ("euler", "heun", "rk4")
#: The divergence estimators of :func:`flow_matching_log_prob`: exact trace, or Hutchinson's estimate.
DIVERGENCES = ("exact", "hutchinson")


def check_batch(
    model: VelocityModel, x0: Tensor, cond: Condition | None, cond_model: VelocityModel | None = None
) -> None:
    """A loss's input checks: ``x0`` ``(N, *model.event_shape)`` and the condition of ``cond_model`` (default
    ``model``), by value only where that model validates its inputs (a GPU synchronisation)."""
    check_event_shape("x0", x0, model.event_shape)
    cond_model = model if cond_model is None else cond_model
    check_cond(cond_model, cond, x0.shape[:1], validate=getattr(cond_model, "validate_args", True))


def noise_and_drop(
    x0: Tensor, cond: Condition | None, cond_drop: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    r"""The noise :math:`\epsilon` (``x0``'s shape and dtype) and the null-condition mask ``(N,)``, in this order."""
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    return eps, guidance_dropout(x0.shape[0], cond_drop if cond is not None else 0.0, x0.device, generator)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    r""":math:`x_t = (1 - t) x_0 + t \epsilon` for times ``t`` ``(N,)``."""
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))  # (N, 1, ...)
    return (1 - tb) * x0 + tb * eps


@dataclass
class FlowMatchingLoss:
    r"""Mean squared error :math:`\| v_\theta(x_t, t, y) - (\epsilon - x_0) \|^2` per dimension.

    Arguments:
        cond_drop: Probability of the null condition per example (for classifier-free guidance).
    """

    cond_drop: float = 0.1

    def __call__(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        check_batch(model, x0, cond)
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        eps, drop = noise_and_drop(x0, cond, self.cond_drop, generator)
        v, _ = model(interpolate(x0, eps, t), t, cond, drop)
        return (upcast(v) - upcast(eps - x0)).square().mean()


def descending_times(model: VelocityModel, noise: Tensor, steps: int, cond: Condition | None, shift: float) -> Tensor:
    """A sampler's input checks, then its times ``1 = t_T > ... > t_0 = 0`` on NTM's (shifted) grid."""
    check_event_shape("noise", noise, model.event_shape)
    check_finite("noise", noise)
    check_cond(model, cond, noise.shape[:1])
    return time_grid(steps, 0.0, shift, device=noise.device).flip(0)


@torch.no_grad()
def euler_sample(
    model: VelocityModel,
    noise: Tensor,
    steps: int,
    *,
    cond: Condition | None = None,
    guidance: float = 0.0,
    shift: float = 1.0,
) -> Tensor:
    r"""Euler integration of :math:`dx/dt = v` from :math:`t = 1` to 0 in ``steps`` steps.

    Arguments:
        model: The velocity model.
        noise: :math:`x_1 \sim \mathcal{N}(0, I)`, shape ``(N, *event)``.
        steps: Number of steps (network evaluations without guidance).
        cond: Flat condition ``(N, ...)`` or ``None``.
        guidance: Classifier-free guidance weight.
        shift: The time grid's shift (see :func:`trajflow.time_grid`).
    """
    return _integrate(model, noise, steps, cond, guidance, shift, heun=False)


@torch.no_grad()
def heun_sample(
    model: VelocityModel,
    noise: Tensor,
    steps: int,
    *,
    cond: Condition | None = None,
    guidance: float = 0.0,
    shift: float = 1.0,
) -> Tensor:
    r"""Heun's second-order integration (EDM Algorithm 1 without churn); the last step is Euler.

    Uses :math:`2 \cdot \text{steps} - 1` network evaluations. Arguments as in :func:`euler_sample`.
    """
    return _integrate(model, noise, steps, cond, guidance, shift, heun=True)


def _integrate(
    model: VelocityModel, noise: Tensor, steps: int, cond: Condition | None, guidance: float, shift: float, heun: bool
) -> Tensor:
    ts = descending_times(model, noise, steps, cond, shift)
    x, n = noise, noise.shape[0]
    for t, s in zip(ts[:-1], ts[1:]):
        v = guided_velocity(model, x, t.expand(n), cond, guidance)
        x_next = x + (s - t) * v
        if heun and s > 0:  # the trapezoidal correction, except at t = 0 where v is not needed
            x_next = x + (s - t) * 0.5 * (v + guided_velocity(model, x_next, s.expand(n), cond, guidance))
        x = x_next
    return x


def _velocity_and_divergence(
    model: VelocityModel, x: Tensor, t: float, cond: Condition | None, probes: Tensor | None
) -> tuple[Tensor, Tensor]:
    r"""``(v, div v)`` at ``(x, t)``: ``v`` detached ``(N, *event)``, ``div v`` float64 ``(N,)``.

    ``probes`` ``(P, N, *event)`` gives Hutchinson's :math:`\frac{1}{P}\sum_k z_k^\top (\partial v / \partial x)
    z_k`; ``None`` the exact trace, one backward pass per dimension. Both read the per-example Jacobian off
    the gradient of a batch sum, which is right because the model acts on each example independently.
    """
    n = x.shape[0]
    with torch.enable_grad():  # the divergence needs autograd even when the caller is in no_grad
        x = x.detach().requires_grad_(True)
        v = model(x, torch.full((n,), t, dtype=x.dtype, device=x.device), cond)[0]
        if not v.requires_grad:  # a velocity that does not depend on x (or on anything): div v = 0
            return v.detach(), torch.zeros(n, dtype=torch.float64, device=x.device)
        div = _exact_divergence(v, x) if probes is None else _hutchinson_divergence(v, x, probes)
    return v.detach(), div


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    n = x.shape[0]
    div = torch.zeros(n, dtype=torch.float64, device=x.device)
    v_flat = v.reshape(n, -1)  # (N, D)
    dims = v_flat.shape[1]
    for i in range(dims):
        # Row i of each example's Jacobian, of which only the diagonal entry (i, i) is kept.
        (g,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=i < dims - 1, allow_unused=True)
        if g is not None:
            div += g.reshape(n, -1)[:, i].double()
    return div


def _hutchinson_divergence(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    n = x.shape[0]
    div = torch.zeros(n, dtype=torch.float64, device=x.device)
    for k, z in enumerate(probes):
        # z^T J z from one vector-Jacobian product z^T J, (N, *event).
        (g,) = torch.autograd.grad(v, x, z, retain_graph=k < len(probes) - 1, allow_unused=True)
        if g is not None:
            div += (g * z).reshape(n, -1).sum(1).double()
    return div / len(probes)


def _check_ode_arguments(
    model: VelocityModel, x0: Tensor, cond: Condition | None, t_min: object, solver: object, divergence: object
) -> None:
    """Finite floating-point points ``(N, *event_shape)``, their condition, and the solver's options."""
    check_event_shape("x0", x0, model.event_shape)
    if x0.dim() != len(model.event_shape) + 1 or not x0.is_floating_point():
        raise ValueError(
            f"x0: expected a floating-point tensor of shape (N, *{tuple(model.event_shape)}), "
            f"got {x0.dtype} of shape {tuple(x0.shape)}"
        )
    check_finite("x0", x0)
    check_cond(model, cond, x0.shape[:1])
    if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min: expected a time in [0, 1), got {t_min!r}")
    for name, value, allowed in (("solver", solver, SOLVERS), ("divergence", divergence, DIVERGENCES)):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _ode_step(
    f: Callable[[Tensor, float], tuple[Tensor, Tensor]], solver: str, x: Tensor, ell: Tensor, t: float, s: float
) -> tuple[Tensor, Tensor]:
    """One step from ``t`` to ``s`` of the augmented state ``(x, ell)`` (Euler, Heun or classical RK4)."""
    h = s - t
    v1, d1 = f(x, t)
    if solver == "euler":
        return x + h * v1, ell + h * d1
    if solver == "heun":
        v2, d2 = f(x + h * v1, s)
        return x + 0.5 * h * (v1 + v2), ell + 0.5 * h * (d1 + d2)
    v2, d2 = f(x + 0.5 * h * v1, t + 0.5 * h)
    v3, d3 = f(x + 0.5 * h * v2, t + 0.5 * h)
    v4, d4 = f(x + h * v3, s)
    return x + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4), ell + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)


def flow_matching_log_prob(
    model: VelocityModel,
    x0: Tensor,
    *,
    steps: int = 32,
    t_min: float = 0.0,
    solver: str = "rk4",
    divergence: str = "exact",
    probes: int = 1,
    cond: Condition | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Log-density of a flow-matching model by its probability-flow ODE (FFJORD's instantaneous change of variables).

    With :math:`x_1 \sim \mathcal{N}(0, I)` carried by :math:`dx/dt = v(x, t)`, the continuity equation gives
    :math:`\frac{d}{dt} \log p_t(x_t) = -\nabla \cdot v(x_t, t)` along a solution, so from :math:`x_{t_{\min}} = x_0`

    .. math:: \log p_{t_{\min}}(x_0) = \log \mathcal{N}(x_1; 0, I) + \int_{t_{\min}}^{1} \nabla \cdot v(x_t, t)\, dt

    (Grathwohl et al., 2019, Eq. 4; Song et al., 2021, App. D.2), solved with ``steps`` fixed steps from
    :math:`t_{\min}` to 1 on the augmented state. It converges as ``steps`` grows (RK4: :math:`3 \cdot 10^{-7}`
    nats at 32 steps on the tests' Gaussian, Heun :math:`10^{-2}` at 64): check a number by doubling ``steps``.
    The divergence is exact (one backward pass per dimension) or Hutchinson's unbiased
    :math:`z^\top (\partial v / \partial x) z` with ``probes`` Rademacher :math:`z` held fixed along the solve.
    It runs under :func:`torch.enable_grad` (also inside ``torch.no_grad()``) and returns a detached result; the
    model must treat examples independently (``model.eval()``).

    Arguments:
        model: The velocity model, :math:`v = \epsilon - x_0` at :math:`x_t = (1 - t) x_0 + t \epsilon`.
        x0: The points ``(N, *event_shape)`` whose log-density is wanted.
        steps: The number of solver steps (1, 2 or 4 network evaluations each for Euler, Heun and RK4).
        t_min: The time the points are read at: the result is :math:`\log p_{t_{\min}}(x_0)`, a proper
            density for :math:`t_{\min} \in [0, 1)`. Use the low end of the times the model was trained on
            when its velocity is unreliable at :math:`t = 0`.
        solver: ``"euler"``, ``"heun"`` or ``"rk4"``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        probes: Rademacher probes per example for ``"hutchinson"`` (more probes, lower variance).
        cond: Flat condition ``(N, ...)`` or ``None`` (no guidance: a guided velocity has no such density).
        generator: The random generator of the probes.

    Returns:
        :math:`\log p_{t_{\min}}(x_0)` in nats, summed over the event, shape ``(N,)``, float64.

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> model = MLPVelocity(features=2).eval()
        >>> flow_matching_log_prob(model, torch.randn(3, 2), steps=4).shape
        torch.Size([3])
    """
    _check_ode_arguments(model, x0, cond, t_min, solver, divergence)
    steps = check_count("steps", steps)
    probes = check_count("probes", probes)
    x = upcast(x0.detach())  # (N, *event), the ODE state in the data's precision (float32 at least)
    z = None
    if divergence == "hutchinson":
        # Rademacher probes (P, N, *event), fixed for the whole solve: the integral of z^T J z is then an
        # unbiased estimate of the integral of tr J.
        bits = torch.randint(0, 2, (probes, *x.shape), generator=generator, device=x.device)
        z = (2 * bits - 1).to(x.dtype)

    def f(y: Tensor, t: float) -> tuple[Tensor, Tensor]:
        return _velocity_and_divergence(model, y, t, cond, z)

    grid = torch.linspace(float(t_min), 1.0, steps + 1, dtype=torch.float64).tolist()
    ell = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)  # the integral of div v, (N,)
    for t, s in zip(grid[:-1], grid[1:]):
        x, ell = _ode_step(f, solver, x, ell, t, s)
    x1 = x.reshape(x.shape[0], -1).double()  # (N, D)
    return -0.5 * x1.square().sum(1) - 0.5 * x1.shape[1] * math.log(2 * math.pi) + ell


def flow_matching_bits_per_dim(
    model: VelocityModel,
    x_int: Tensor,
    levels: int,
    *,
    num_samples: int = 1,
    data_range: tuple[float, float] = (-1.0, 1.0),
    steps: int = 32,
    t_min: float = 0.0,
    solver: str = "rk4",
    divergence: str = "exact",
    probes: int = 1,
    cond: Condition | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Dequantised bits/dim of a flow-matching model on integer images, from its exact ODE log-density.

    .. math:: \text{bpd}(x) = \frac{1}{S} \sum_{j=1}^{S} \Big[-\frac{\log p_{t_{\min}}(y_j)}{D \ln 2}\Big]
              + \log_2 \frac{K}{w}, \qquad y_j = \text{dequantize}(x, u_j),

    with :math:`\log p_{t_{\min}}` from :func:`flow_matching_log_prob` and the dequantisation and offset of
    :mod:`trajflow.likelihood`. In expectation over :math:`u` (and the Hutchinson probes) it is the
    variational upper bound of uniform dequantisation on the discrete NLL (Theis et al., 2016; Ho et al.,
    2019), with no ELBO gap, up to the solver's error. ``t_min > 0`` bounds the NLL by the model's marginal at
    :math:`t_{\min}` instead, a slightly blurred but proper density.

    Arguments:
        model: The velocity model, trained on data scaled to ``data_range``.
        x_int: Integer images ``(N, *event_shape)`` in ``[0, levels - 1]``, on the model's device.
        levels: The number of values :math:`K` per dimension (256 for 8-bit images).
        num_samples: Dequantisation draws :math:`S` averaged per image.
        data_range: ``(-1, 1)`` (trajflow's image models), ``(0, 1)`` or ``(0, levels)``.
        steps, t_min, solver, divergence, probes, cond: As in :func:`flow_matching_log_prob`.
        generator: The random generator of the dequantisation noise and of the probes.

    Returns:
        Bits/dim per image, shape ``(N,)``, float64.

    References:
        | A note on the evaluation of generative models (Theis, van den Oord and Bethge, 2016).
        | https://arxiv.org/abs/1511.01844
        | Flow++ (Ho et al., 2019), Section 3.1 (uniform dequantisation as a variational bound).
        | https://arxiv.org/abs/1902.00275

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> model = MLPVelocity(features=4).eval()
        >>> x = torch.randint(0, 17, (3, 4))
        >>> flow_matching_bits_per_dim(model, x, 17, steps=4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3])
    """
    check_event_shape("x_int", x_int, model.event_shape)
    # Dequantised into the model's floating dtype (its first floating parameter or buffer; float32 if none).
    tensors = (*model.parameters(), *model.buffers())
    dtype = next((p.dtype for p in tensors if p.is_floating_point()), torch.float32)
    ode = dict(steps=steps, t_min=t_min, solver=solver, divergence=divergence, probes=probes, cond=cond)
    return flow_bits_per_dim(
        lambda y: flow_matching_log_prob(model, y, generator=generator, **ode),  # type: ignore[arg-type]
        x_int,
        levels,
        event_dim=len(model.event_shape),
        num_samples=num_samples,
        generator=generator,
        data_range=data_range,
        dtype=dtype,
    )
