r"""The Markov forward (noising) process of a Normalizing Trajectory Model.

The marginals are those of rectified flow / flow matching, :math:`x_t = (1 - t) x_0 + t \epsilon`, so
:math:`q(x_t | x_0) = \mathcal{N}((1 - t) x_0, t^2 I)`. On a grid :math:`t_0 < \dots < t_T = 1` the
states are chained by independent Gaussian steps

.. math:: x_t = \alpha_{s,t} x_s + \sigma_{s,t} \epsilon, \qquad
          \alpha_{s,t} = \frac{1 - t}{1 - s}, \qquad \sigma_{s,t}^2 = t^2 - \alpha_{s,t}^2 s^2,

which keep the marginals (Proposition 1 of the paper) and make consecutive states correlated.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), Sections 2 and A.4-A.6.
    | https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .checks import check_event_shape, check_finite, check_grid, check_tensor, check_times

__all__ = ["MarkovInterpolant", "time_grid", "sequence_shift", "sample_t_min", "TRAIN_T_MIN", "SAMPLE_T_MIN"]

#: The range of the per-example cleanest time :math:`t_{\min} \sim U[0, 0.05]` drawn in training (NTM Table 5):
#: the default of :class:`~trajflow.TrajectoryNLL`.
TRAIN_T_MIN: tuple[float, float] = (0.0, 0.05)

#: The cleanest time at which a trained model is used (sampling, denoising, likelihood bounds): NTM samples
#: with :math:`s = 0.02` at the last step (NTM Table 3). At :math:`t_{\min} = 0` trajectory score denoising
#: changes nothing and a :class:`~trajflow.predictors.FlowMatchingPredictor`'s last step has only its floor.
SAMPLE_T_MIN: float = 0.02


def sequence_shift(num_tokens: int) -> float:
    r"""The SD3-style shift factor :math:`e^{\mu}` for a sequence of ``num_tokens`` tokens.

    :math:`\mu = 0.5 + 0.65 (L - 256) / (4096 - 256)` (NTM App. C.4), so 256 tokens give
    :math:`e^{0.5} \approx 1.65` and 1024 tokens :math:`e^{0.63} \approx 1.88`.

    Example:
        >>> round(sequence_shift(256), 4)
        1.6487
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens: expected a positive integer, got {num_tokens}")
    mu = 0.5 + 0.65 * (num_tokens - 256) / (4096 - 256)
    return math.exp(mu)


def _check_grid_arguments(steps: object, t_min: object, shift: object) -> None:
    _check_steps_and_shift(steps, shift)
    real = isinstance(t_min, numbers.Real) and not isinstance(t_min, bool)
    if not (real or (isinstance(t_min, Tensor) and t_min.is_floating_point())):
        raise ValueError(f"t_min: expected a number or a floating-point tensor, got {t_min!r}")


def _check_steps_and_shift(steps: object, shift: object) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a positive finite number, got {shift!r}")


def _check_grid_values(t_min: Tensor, levels: Tensor, steps: int, shift: float, dtype: torch.dtype) -> None:
    """``t_min`` in [0, 1] and below the first level, and levels that stay positive and distinct in ``dtype``."""
    check_times("t_min", t_min)
    # The levels as they will be stored: a tiny shift or a huge number of steps can round them together.
    stored = levels.to(dtype)
    if not bool((stored[1:] > stored[:-1]).all()) or not bool(stored[0] > 0):
        blame = "shift" if shift != 1 else "steps"
        raise ValueError(
            f"{blame}: expected grid levels that stay positive and distinct in {dtype}, got steps={steps} "
            f"and shift={shift!r}, whose first levels are {stored[:3].tolist()}"
        )
    if bool((t_min.to(dtype) >= stored[0]).any()):
        raise ValueError(
            f"t_min: expected values below the first level {float(levels[0]):.6g} of the grid "
            f"(steps={steps}, shift={shift}), got max {float(t_min.max()):.6g}"
        )


def time_grid(
    steps: int,
    t_min: float | Tensor = 0.0,
    shift: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    validate: bool = True,
) -> Tensor:
    r"""The ascending time grid :math:`(t_{\min}, \sigma_1, \dots, \sigma_T)` with :math:`\sigma_T = 1`.

    The base levels :math:`\tilde\sigma_k = k / T` are shifted as
    :math:`\sigma_k = \text{shift} \cdot \tilde\sigma_k / (1 + (\text{shift} - 1) \tilde\sigma_k)`
    (``shift = 1`` keeps them uniform; use :func:`sequence_shift` for images).

    Arguments:
        steps: The number of reverse steps :math:`T \geq 1`.
        t_min: The cleanest time :math:`t_0`. A tensor of shape ``batch`` gives one grid per example,
            of shape ``(*batch, steps + 1)`` (per-example :math:`t_{\min}` during training).
        shift: The shift factor, positive.
        validate: Check that ``t_min`` is in ``[0, 1]`` and below the first level (reads its values: a
            GPU synchronisation for a tensor on the GPU).

    Example:
        >>> time_grid(4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """
    _check_grid_arguments(steps, t_min, shift)
    # Built where t_min lives (no host-device copy for a per-example t_min on the GPU).
    t_min = torch.as_tensor(t_min, dtype=torch.float64)
    base = torch.arange(1, steps + 1, dtype=torch.float64, device=t_min.device) / steps
    levels = shift * base / (1 + (shift - 1) * base)
    levels[-1] = 1.0  # exact, whatever the rounding
    if validate:
        _check_grid_values(t_min, levels, steps, shift, dtype)
    grid = torch.cat([t_min[..., None], levels.expand(*t_min.shape, steps)], dim=-1)
    return grid.to(dtype=dtype, device=device)


def sample_t_min(
    shape: torch.Size | tuple[int, ...],
    low: float = TRAIN_T_MIN[0],
    high: float = TRAIN_T_MIN[1],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Per-example :math:`t_{\min} \sim U[\text{low}, \text{high}]` (default :data:`TRAIN_T_MIN`, NTM Table 5)."""
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"(low, high): expected 0 <= low <= high < 1, got ({low}, {high})")
    u = torch.rand(shape, generator=generator, device=device)
    return low + (high - low) * u


class MarkovInterpolant:
    r"""The Markov forward process :math:`q(x_{t_0}, \dots, x_{t_T} | x_0)` on a time grid.

    Arguments:
        event_dim: The number of trailing dimensions of one data point (1 for vectors, 3 for images).
            The trajectory's level axis sits just before them: ``traj[..., k, *event]``.

    Example:
        >>> proc = MarkovInterpolant()
        >>> x0 = torch.randn(8, 2)
        >>> traj = proc.sample(x0, time_grid(4))
        >>> traj.shape
        torch.Size([8, 5, 2])
        >>> A, B, C = proc.posterior(torch.tensor(1.0), torch.tensor(0.5))
        >>> float(A), float(B), float(C)
        (0.0, 0.5, 0.5)
    """

    def __init__(self, event_dim: int = 1) -> None:
        if not isinstance(event_dim, int) or event_dim < 0:
            raise ValueError(f"event_dim: expected a non-negative integer, got {event_dim!r}")
        self.event_dim = event_dim

    def __repr__(self) -> str:
        return f"MarkovInterpolant(event_dim={self.event_dim})"

    # -- one step -------------------------------------------------------------------------------------------

    @staticmethod
    def transition(s: Tensor, t: Tensor, *, validate: bool = True) -> tuple[Tensor, Tensor]:
        r"""Coefficients :math:`(\alpha_{s,t}, \sigma_{s,t})` of :math:`x_t = \alpha x_s + \sigma \epsilon`, with
        :math:`\sigma^2 = (t - s)(t + s - 2ts) / (1 - s)^2` (no cancellation for ``s -> t``).

        Defined for :math:`0 \leq s \leq t \leq 1`, ``s < 1``. ``validate`` checks this (and finite times)
        with a ``ValueError`` naming the argument; ``False`` skips the checks, which read the values (a device
        synchronisation on a GPU), for times from a checked grid.
        """
        s, t = torch.as_tensor(s), torch.as_tensor(t)
        if validate:
            check_times("s", s)
            check_times("t", t)
            b_s, b_t = torch.broadcast_tensors(s, t)
            if bool((b_s > b_t).any()) or bool((b_s >= 1).any()):
                raise ValueError(
                    f"(s, t): expected s <= t and s < 1 elementwise, got s={b_s.tolist()} and t={b_t.tolist()}"
                )
        alpha = (1 - t) / (1 - s)
        sigma = torch.sqrt(((t - s) * (t + s - 2 * t * s)).clamp_min(0.0)) / (1 - s)
        return alpha, sigma

    @staticmethod
    def posterior(t: Tensor, s: Tensor, *, validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        r"""Coefficients of the reverse posterior :math:`q(x_s | x_t, x_0) = \mathcal{N}(A x_t + B x_0, C^2)`.

        .. math:: A = \frac{s^2 (1 - t)}{t^2 (1 - s)}, \quad
                  B = \frac{(t - s)(t + s - 2ts)}{t^2 (1 - s)}, \quad
                  C^2 = \frac{s^2 (t - s)(t + s - 2ts)}{t^2 (1 - s)^2}

        for :math:`0 \leq s < t \leq 1` (NTM Prop. 2); at :math:`t = 1` the posterior is the marginal at
        :math:`s`. ``validate=False`` skips the range checks (as in :meth:`transition`).
        """
        t, s = torch.broadcast_tensors(torch.as_tensor(t), torch.as_tensor(s))
        if validate:
            check_times("t", t)
            check_times("s", s)
        if validate and bool((s >= t).any()):
            raise ValueError(f"(t, s): expected s < t elementwise, got t={t.tolist()} and s={s.tolist()}")
        d = (t - s) * (t + s - 2 * t * s)
        A = s**2 * (1 - t) / (t**2 * (1 - s))
        B = d / (t**2 * (1 - s))
        C = s * torch.sqrt(d.clamp_min(0.0)) / (t * (1 - s))
        return A, B, C

    @staticmethod
    def covariance(grid: Tensor) -> Tensor:
        r"""The covariance :math:`S` of the trajectory given :math:`x_0`, shape ``(*batch, T + 1, T + 1)``.

        :math:`\mathrm{Cov}(x_{t_i}, x_{t_j} | x_0) = S_{ij} I` with
        :math:`S_{ij} = \min(t_i, t_j)^2 (1 - \max(t_i, t_j)) / (1 - \min(t_i, t_j))` (NTM Prop. 3), and the
        limits :math:`S_{TT} = 1`, :math:`S_{iT} = 0` for :math:`i < T` at :math:`t_T = 1`.
        """
        check_grid(grid)
        lo = torch.minimum(grid[..., :, None], grid[..., None, :])
        hi = torch.maximum(grid[..., :, None], grid[..., None, :])
        both_one = lo == 1.0
        S = lo**2 * (1 - hi) / torch.where(both_one, torch.ones_like(lo), 1 - lo)
        return torch.where(both_one, torch.ones_like(S), S)

    # -- trajectories ---------------------------------------------------------------------------------------

    def _level_times(self, grid: Tensor, batch_shape: torch.Size) -> Tensor:
        """Grid times shaped to broadcast against ``(*batch, T + 1, *event)``."""
        grid = grid.expand(*torch.broadcast_shapes(grid.shape[:-1], batch_shape), grid.shape[-1])
        return grid.reshape(*grid.shape, *([1] * self.event_dim))

    def sample(
        self,
        x0: Tensor,
        grid: Tensor,
        *,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> Tensor:
        r"""Draw a trajectory: :math:`x_{t_0} = (1 - t_0) x_0 + t_0 \epsilon_0`, then :math:`x_{t_{k+1}} =
        \alpha x_{t_k} + \sigma \epsilon_{k+1}` with fresh noise at every step.

        Arguments:
            x0: Clean data, shape ``(*batch, *event)``.
            grid: The time grid, shape ``(T + 1,)`` or ``(*batch, T + 1)``.
            generator: The :class:`torch.Generator` that draws the noise (``None``: the global one).
            validate: Check the grid's times and that ``x0`` is finite (reads values: a GPU sync).

        Returns:
            The trajectory, shape ``(*batch, T + 1, *event)``; ``traj[..., k, *event]`` is :math:`x_{t_k}`.
        """
        x0, times, level = self._prepare("x0", x0, grid, validate)
        t0 = times.select(level, 0)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self._chain((1 - t0) * x0 + t0 * noise, times, level, generator)

    def sample_from(
        self,
        x_start: Tensor,
        grid: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Continue the chain from a given state :math:`x_{t_0}` (used by the ELBO).

        Same shapes as :meth:`sample`; ``traj[..., 0, *event]`` is ``x_start``.
        """
        x_start, times, level = self._prepare("x_start", x_start, grid)
        return self._chain(x_start, times, level, generator)

    def _prepare(self, name: str, x: Tensor, grid: Tensor, validate: bool = True) -> tuple[Tensor, Tensor, int]:
        check_tensor(name, x)
        check_grid(grid, validate=validate)
        if x.dim() < self.event_dim:
            raise ValueError(f"{name}: expected at least {self.event_dim} dims (the event), got {tuple(x.shape)}")
        if validate:
            check_finite(name, x)
        event = x.shape[x.dim() - self.event_dim :]
        times = self._level_times(grid.to(x), x.shape[: x.dim() - self.event_dim])  # (*batch, T+1, *1)
        level = times.dim() - self.event_dim - 1
        return x.expand(*times.shape[:level], *event), times, level

    def _chain(self, x: Tensor, times: Tensor, level: int, generator: torch.Generator | None) -> Tensor:
        states = [x]
        for k in range(times.shape[level] - 1):
            # the grid was checked by _prepare (when asked to): no value checks per step
            alpha, sigma = self.transition(times.select(level, k), times.select(level, k + 1), validate=False)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            states.append(alpha * states[-1] + sigma * noise)
        return torch.stack(states, dim=level)

    def log_prob(self, traj: Tensor, grid: Tensor) -> Tensor:
        r""":math:`\log q(x_{t_1}, \dots, x_{t_T} | x_{t_0})`, summed over the event, shape ``batch``.

        Arguments:
            traj: A trajectory, shape ``(*batch, T + 1, *event)``.
            grid: The time grid, shape ``(T + 1,)`` or ``(*batch, T + 1)``.
        """
        check_tensor("traj", traj)
        check_grid(grid)
        steps = grid.shape[-1] - 1
        level = traj.dim() - self.event_dim - 1
        if level < 0 or traj.shape[level] != steps + 1:
            raise ValueError(
                f"traj: expected shape (*batch, {steps + 1}, *event) with {self.event_dim} event dims "
                f"for a grid of {steps + 1} times, got {tuple(traj.shape)}"
            )
        check_finite("traj", traj)
        times = self._level_times(grid.to(traj), traj.shape[:level])
        s, t = times.narrow(level, 0, steps), times.narrow(level, 1, steps)
        alpha, sigma = self.transition(s, t, validate=False)  # a checked grid
        x_s, x_t = traj.narrow(level, 0, steps), traj.narrow(level, 1, steps)
        z = (x_t - alpha * x_s) / sigma
        logp = -0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
        logp = logp.expand(*torch.broadcast_shapes(logp.shape, x_t.shape))
        return logp.flatten(level).sum(-1)

    def check_trajectory(self, traj: Tensor, steps: int, event_shape: torch.Size) -> Tensor:
        """Raise unless ``traj`` has shape ``(*batch, steps + 1, *event_shape)``."""
        return check_event_shape("traj", traj, (steps + 1, *event_shape), "(T + 1, *event)")
