r"""Lower bounds on the data likelihood :math:`\log p(x_{t_0})` of a trajectory distribution: ELBO and IWAE,
with the forward process :math:`q(x_{t_{1:T}} | x_{t_0})` as the proposal (methods of
:class:`~trajflow.TrajectoryDistribution`, through the :class:`LikelihoodBounds` base).

Two readings of the input ``x0``:

* ``from_data=False`` (the default): ``x0`` *is* :math:`x_{t_0}`, and the bound is on the density of the
  cleanest level (of noised data when :math:`t_0 > 0`).
* ``from_data=True``: ``x0`` is clean data :math:`y`; each trajectory draws
  :math:`x_{t_0} \sim \mathcal{N}((1 - t_0) y, t_0^2 I)`, and the Gaussian decoder
  :math:`p(y | x_{t_0}) = \mathcal{N}(y; x_{t_0} / (1 - t_0), (t_0 / (1 - t_0))^2 I)` (the forward step read
  backwards) closes the model, so that

  .. math:: \log p(y) \geq \mathbb{E}_{q(x_{t_{0:T}} | y)}\big[\log p(x_{t_0}, \dots, x_{t_T})
            - \log q(x_{t_{1:T}} | x_{t_0})\big] + D \log(1 - t_0).

  Both readings agree at :math:`t_0 = 0`. The decoder's blur (scale :math:`t_0 / (1 - t_0)`) is part of the
  gap: small against the bins of 17-level digits, a few bits/dim for 8-bit images at :math:`t_0 = 0.02`.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
from torch import Tensor

from ..checks import check_count

__all__ = ["LikelihoodBounds"]


class LikelihoodBounds:
    """The ELBO and IWAE bounds of :class:`~trajflow.TrajectoryDistribution` (a base class, not used alone).

    It relies on the distribution's ``log_prob`` of trajectories, its forward ``process``, ``data_shape``,
    and its ``_check_value`` (shape and value checks of ``x0``) and ``_times`` (the grid for a batch).
    """

    def _log_weights(self, x0: Tensor, lead: torch.Size, from_data: bool, generator: torch.Generator | None) -> Tensor:
        """One log importance weight per point of ``x0`` ``(*lead, *data)`` (see the module docstring)."""
        grid = self._times(lead)
        # from_data draws x_{t_0} ~ q(. | y) first; otherwise x0 is x_{t_0}
        draw = self.process.sample if from_data else self.process.sample_from
        traj = draw(x0, grid, generator=generator)
        log_w = self.log_prob(traj) - self.process.log_prob(traj, grid)
        if from_data:  # + log p(y | x_{t_0}) - log q(x_{t_0} | y)
            log_w = log_w + self.data_shape.numel() * torch.log1p(-grid[..., 0].to(traj.dtype))
        return log_w

    def _check_x0(self, x0: Tensor, num_samples: int) -> tuple[torch.Size, int]:
        return self._check_value("x0", x0, self.data_shape), check_count("num_samples", num_samples)

    def elbo(
        self, x0: Tensor, num_samples: int = 1, *, generator: torch.Generator | None = None, from_data: bool = False
    ) -> Tensor:
        r"""A lower bound on :math:`\log p(x_{t_0})` with the forward process as the proposal (nats).

        .. math:: \log p(x_{t_0}) \geq \mathbb{E}_{q(x_{t_{1:T}} | x_{t_0})}
                  [\log p(x_{t_0}, \dots, x_{t_T}) - \log q(x_{t_1}, \dots, x_{t_T} | x_{t_0})]

        Arguments:
            x0: The state at :math:`t_0` (the data itself when ``grid[0] = 0``), shape ``(*lead, *data)``;
                with ``from_data``, clean data.
            num_samples: Forward trajectories averaged per data point (the bound holds for any number).
            from_data: Bound :math:`\log p(y)` of clean data ``x0 = y`` instead, through the Gaussian decoder
                at :math:`t_0` (see the module docstring).

        Returns:
            The Monte-Carlo ELBO, shape ``lead`` broadcast with the batch, in nats (sum over dims).

        :meth:`iwae` is the tighter importance-weighted bound; :meth:`bounds` gives both from the same draws.
        """
        lead, num_samples = self._check_x0(x0, num_samples)
        x0 = x0.expand(*lead, *self.data_shape)
        total = 0.0
        for _ in range(num_samples):
            total = total + self._log_weights(x0, lead, from_data, generator)
        return total / num_samples

    def log_importance_weights(
        self, x0: Tensor, num_samples: int = 1, *, generator: torch.Generator | None = None, from_data: bool = False
    ) -> Tensor:
        r"""Log importance weights :math:`\log w_k = \log p(x_{t_0}, x^{(k)}_{t_{1:T}})
        - \log q(x^{(k)}_{t_{1:T}} | x_{t_0})` of ``num_samples`` forward trajectories drawn in one batch
        (with ``from_data``, each draws its own :math:`x_{t_0}` and carries the decoder's
        :math:`D \log(1 - t_0)`).

        Returns:
            ``(num_samples, *lead)`` with ``lead`` the leading shape of ``x0`` broadcast with the batch.
            Their mean is the ELBO estimate and their log-mean-exp the IWAE estimate.
        """
        lead, num_samples = self._check_x0(x0, num_samples)
        x0 = x0.expand(num_samples, *lead, *self.data_shape)
        return self._log_weights(x0, torch.Size((num_samples, *lead)), from_data, generator)

    def iwae(
        self,
        x0: Tensor,
        num_samples: int = 1,
        *,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        from_data: bool = False,
    ) -> Tensor:
        r"""The importance-weighted lower bound (IWAE) on :math:`\log p(x_{t_0})`, in nats.

        With :math:`K` forward trajectories :math:`x^{(k)}_{t_{1:T}} \sim q(\cdot | x_{t_0})` per data point,

        .. math:: \log p(x_{t_0}) \geq \mathcal{L}_K = \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^{K}
                  \frac{p(x_{t_0}, x^{(k)}_{t_1}, \dots, x^{(k)}_{t_T})}
                  {q(x^{(k)}_{t_1}, \dots, x^{(k)}_{t_T} | x_{t_0})}\Big].

        :math:`\mathcal{L}_1` is the ELBO; :math:`\mathcal{L}_K` increases with :math:`K` towards
        :math:`\log p(x_{t_0})` for bounded weights (Burda et al., 2016, Theorem 1), at the cost of ``K``
        batched trajectories. The log-mean-exp is a running ``logsumexp`` over chunks, so ``K`` may exceed memory.

        Arguments:
            x0: The state at :math:`t_0` (the data itself when ``grid[0] = 0``), shape ``(*lead, *data)``
                broadcastable with the batch shape (the condition's and the grid's).
            num_samples: :math:`K \geq 1`, the forward trajectories per data point.
            chunk_size: Trajectories per data point sent through the networks at once (default: all ``K`` when
                ``K * lead.numel() <= 4096``; memory scales with ``chunk_size * lead.numel() * (T + 1) * D``).
                With ``chunk_size=1`` and ``K=1`` the draws are :meth:`elbo`'s for the same ``generator`` state.
            generator: The random generator of the forward trajectories.
            dtype: The floating dtype of the accumulation and of the result (float32 or float64).
            from_data: Bound :math:`\log p(y)` of clean data ``x0 = y`` instead, through the Gaussian
                decoder at :math:`t_0` (see the module docstring).

        Returns:
            The Monte-Carlo IWAE bound, shape ``lead`` broadcast with the batch, in ``dtype``.

        Example:
            >>> import trajflow
            >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
            ...                      trajflow.predictors.MLPPredictor(features=2))
            >>> dist = model.distribution(trajflow.time_grid(4, 0.0))
            >>> dist.iwae(torch.randn(8, 2), num_samples=16).shape
            torch.Size([8])

        References:
            | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, ICLR 2016).
            | https://arxiv.org/abs/1509.00519
        """
        return self.bounds(
            x0, num_samples, chunk_size=chunk_size, generator=generator, dtype=dtype, from_data=from_data
        )[0]

    def bounds(
        self,
        x0: Tensor,
        num_samples: int = 1,
        *,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        from_data: bool = False,
    ) -> tuple[Tensor, Tensor]:
        r"""The IWAE and the ELBO estimates from the same ``num_samples`` forward trajectories (nats).

        ``(log mean_k w_k, mean_k log w_k)`` of the weights of :meth:`log_importance_weights`: :meth:`iwae`
        and the ELBO averaged over the same :math:`K` draws (:meth:`elbo` with ``num_samples=K``, up to the
        order of the draws), both for one set of network evaluations. Same arguments as :meth:`iwae`.
        """
        lead, num_samples = self._check_x0(x0, num_samples)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if chunk_size is None:
            chunk_size = max(1, min(num_samples, 4096 // max(1, lead.numel())))
        chunk_size = check_count("chunk_size", chunk_size)
        lses, sums = [], []  # per chunk: the logsumexp and the sum of the log weights, (*lead,)
        for done in range(0, num_samples, chunk_size):
            c = min(chunk_size, num_samples - done)
            log_w = self.log_importance_weights(x0, c, generator=generator, from_data=from_data).to(dtype)
            lses.append(torch.logsumexp(log_w, dim=0))
            sums.append(log_w.sum(0))
        return reduce(torch.logaddexp, lses) - math.log(num_samples), reduce(torch.add, sums) / num_samples
