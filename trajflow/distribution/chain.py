r"""The reverse chain of a :class:`~trajflow.TrajectoryDistribution`: each step as a flow distribution, and
sampling from noise towards data (NTM Algorithm 2, steps 1-3), and what the distribution's modules share: the
standard normal log-density, event sums and the checks of its parts and of sample shapes."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import AffineTransform, Independent, Normal
from zuko.distributions import NormalizingFlow
from zuko.transforms import ComposedTransform

from ..checks import check_event_shape, check_step_index
from ..numerics import upcast
from ..predictors.base import INPUT_SPACES, Predictor
from ..transporters.base import Transporter

__all__ = ["ReverseChain", "check_compatible"]


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _std_normal_log_prob(z: Tensor, event_dim: int) -> Tensor:
    """``log N(z; 0, I)`` summed over the ``event_dim`` rightmost dims, in float32."""
    z = upcast(z)
    return (-0.5 * z.square() - _HALF_LOG_2PI).flatten(z.dim() - event_dim).sum(-1)


def _sum_event(x: Tensor, event_dim: int) -> Tensor:
    return x.flatten(x.dim() - event_dim).sum(-1) if event_dim else x


def check_compatible(transporter: Transporter, predictor: Predictor) -> None:
    """Raise unless the transporter and the predictor are trajflow modules with the same event shape."""
    if not isinstance(transporter, Transporter):
        raise ValueError(f"transporter: expected a trajflow Transporter, got {type(transporter).__name__}")
    if not isinstance(predictor, Predictor):
        raise ValueError(f"predictor: expected a trajflow Predictor, got {type(predictor).__name__}")
    if predictor.input_space not in INPUT_SPACES:
        raise ValueError(f"predictor.input_space: expected one of {INPUT_SPACES}, got {predictor.input_space!r}")
    if torch.Size(transporter.event_shape) != torch.Size(predictor.event_shape):
        raise ValueError(
            f"transporter/predictor: their event shapes disagree: the transporter maps "
            f"{tuple(transporter.event_shape)} but the predictor expects {tuple(predictor.event_shape)}"
        )
    if transporter.is_conditional and transporter.cond_event_dims != predictor.cond_event_dims:
        raise ValueError(
            f"transporter/predictor: the transporter is conditional with cond_event_dims "
            f"{transporter.cond_event_dims!r} but the predictor takes {predictor.cond_event_dims!r}; both must "
            "take the same kind of condition (class indices: 0; text (features, mask): (2, 1))"
        )


def _module_device(*modules: torch.nn.Module) -> torch.device | None:
    for m in modules:
        for p in m.parameters():
            return p.device
    return None


def _module_dtype(*modules: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of ``modules`` (``None`` when they have none)."""
    for m in modules:
        for p in m.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _check_sample_shape(sample_shape: object) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``, or a ``ValueError`` unless it is a sequence of integers >= 0."""
    ok = isinstance(sample_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sample_shape
    )
    if not ok:
        raise ValueError(f"sample_shape: expected a tuple of integers >= 0 (e.g. (16,)), got {sample_shape!r}")
    return torch.Size(sample_shape)  # type: ignore[arg-type]


class ReverseChain:
    """The per-step flows and the samplers of :class:`~trajflow.TrajectoryDistribution`, a base class that uses
    the distribution's grid, shapes, networks (``_transport``, ``_inverse``, ``_predict``) and input checks."""

    def step(self, k: int, x_tk: Tensor) -> NormalizingFlow:
        r"""The conditional flow :math:`p(x_{t_{k-1}} | x_{t_k})` for ``k = 1..T`` as a torch ``Distribution``.

        Its transform (data to base, zuko's convention) is the transporter at :math:`t_{k-1}` followed by
        the affine standardisation :math:`(u - \mu_P) / \sigma_P`, over a standard normal base.

        Arguments:
            k: The step index, ``1 <= k <= T``.
            x_tk: The state at :math:`t_k`, shape ``(*lead, *data)`` broadcastable with the batch.
        """
        k = check_step_index(k, self.steps)
        lead = self._check_value("x_tk", x_tk, self.data_shape)
        x_tk = self._as_input("x_tk", x_tk)
        x = x_tk.expand(*lead, *self.data_shape)
        times = self._times(lead)
        t, s = times[..., k], times[..., k - 1]
        reads = x if k == self.steps or self._reads_data else self._transport(x, t)[0]
        mu, sigma = self._predict(reads, t, s, inner=0)
        cond, drop = self._transporter_args(lead, 0, x.device, flat=False)
        transform = ComposedTransform(
            self.transporter.transform(s, cond, drop),
            AffineTransform(upcast(mu), sigma, event_dim=self._data_dim).inv,
        )
        zeros = torch.zeros(*lead, *self.data_shape, device=sigma.device, dtype=sigma.dtype)
        base = Independent(Normal(zeros, torch.ones_like(zeros)), self._data_dim)
        return NormalizingFlow(transform, base)

    # -- sampling ---------------------------------------------------------------------------------------------

    def _chain(
        self, sample_shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None, decode: bool = True
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The predictor chain: latents ``(*lead, T+1, *data)``, draws ``(*lead, T, *data)``, ``sum log
        sigma`` per factor ``(*lead, T)``, and the trajectory in data space where the chain made it (a predictor
        reading data space: each level is inverted before the next step reads it, and the last one with
        ``decode``), else ``None``."""
        lead = _check_sample_shape(sample_shape) + self.batch_shape
        times = self._times(lead)
        u = torch.randn((*lead, *self.data_shape), generator=generator, device=self.grid.device, dtype=self.grid.dtype)
        decode = decode and self._reads_data
        latents, noises, log_sigmas, xs = [u], [], [], [u]  # xs: data-space levels, where the chain makes them
        read = u  # what the predictor reads of the current level: u, or its inverse x for a data-space predictor
        for k in range(self.steps, 0, -1):
            mu, sigma = self._predict(read, times[..., k], times[..., k - 1], inner=0)
            z = torch.randn(sigma.shape, generator=generator, device=sigma.device, dtype=sigma.dtype)
            u = upcast(mu) + sigma * z
            latents.append(u)
            noises.append(z)
            log_sigmas.append(_sum_event(torch.log(sigma), self._data_dim))
            read = u
            if self._reads_data and (k > 1 or decode):  # the last level is read by no step
                read = self._inverse(u, times[..., k - 1])
                xs.append(read)
        level = len(lead)
        return (
            torch.stack(latents[::-1], dim=level),
            torch.stack(noises[::-1], dim=level),
            torch.stack(log_sigmas[::-1], dim=-1),
            torch.stack(xs[::-1], dim=level) if decode else None,
        )

    def rsample_latents(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Run the predictor chain in transporter space (NTM Algorithm 2, steps 1-2); all the noise comes from
        ``generator`` (a :class:`torch.Generator` on the model's device; ``None``: torch's global one).

        Returns:
            ``(u, z)``: the latents :math:`(u_{t_0}, \dots, u_{t_T})` of shape
            ``(*sample_shape, *batch_shape, T + 1, *data)`` (with :math:`u_{t_T} = x_{t_T}`) and the
            standard normal draws ``(*sample_shape, *batch_shape, T, *data)`` that made them
            (``z[..., k - 1, :]`` drew level ``k - 1``), without inverting the transporter at the last level (a
            predictor that reads data space needs the levels above it inverted, and they are).
        """
        latents, z, _, _ = self._chain(sample_shape, generator, decode=False)
        return latents, z

    def decode(self, latents: Tensor) -> Tensor:
        """Invert the transporter at every level below T, batched across levels (Algorithm 2, step 3).

        ``latents`` of shape ``(*lead, T + 1, *data)`` -> the trajectory in data space, same shape.
        """
        check_event_shape("latents", latents, self.event_shape)
        level = latents.dim() - self._data_dim - 1
        lead = latents.shape[:level]
        T = self.steps
        x_lo = self._inverse(latents.narrow(level, 0, T), self._times(lead)[..., :T], inner=1)
        return torch.cat([x_lo, latents.narrow(level, T, 1)], dim=level)

    def rsample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Trajectories generated from noise towards data, ``(*sample_shape, *batch_shape, T + 1, *data)``.

        ``generator``: the :class:`torch.Generator` that draws the noise (see :meth:`rsample_latents`).
        """
        latents, _, _, traj = self._chain(sample_shape, generator)
        return self.decode(latents) if traj is None else traj

    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """:meth:`rsample` without gradients (torch's ``sample``), with an optional ``generator``."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def rsample_and_log_prob(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Samples and their exact log-densities in one pass (zuko's name; Pyro's ``ZukoToPyro`` uses it): the
        chain's draws and scales plus one parallel transporter pass for the log-determinants."""
        latents, z, log_sigma, traj = self._chain(sample_shape, generator)
        traj = self.decode(latents) if traj is None else traj
        level = traj.dim() - self._data_dim - 1
        lead, T, dd = traj.shape[:level], self.steps, self._data_dim
        _, ladj = self._transport(traj.narrow(level, 0, T), self._times(lead)[..., :T], inner=1)
        factors = _std_normal_log_prob(z, dd) - log_sigma + ladj
        prior = _std_normal_log_prob(traj.narrow(level, T, 1).squeeze(level), dd)
        return traj, prior + factors.sum(-1)
