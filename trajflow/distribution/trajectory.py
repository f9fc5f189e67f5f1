r"""The trajectory distribution of a Normalizing Trajectory Model, as a torch ``Distribution``.

.. math:: p(x_{t_0}, \dots, x_{t_T}) = \mathcal{N}(x_{t_T}; 0, I) \prod_{k=1}^{T} p(x_{t_{k-1}} | x_{t_k})

Each factor is a conditional normalizing flow (NTM Eq. 3.1-3.3): the shared transporter
:math:`u_s = f_T(x_s, s)` followed by the standardisation :math:`z = (u_s - \mu_P) / \sigma_P` by the
predictor's Gaussian :math:`(\mu_P, \sigma_P) = P(u_t, t, s, y)`, with :math:`u_t = f_T(x_t, t)` and the
transporter skipped at :math:`t = 1` (or :math:`P(x_t, t, s, y)` for a predictor whose ``input_space`` is
``"data"``). So

.. math:: \log p(x_s | x_t) = \log \mathcal{N}(z; 0, I) - \sum \log \sigma_P
          + \log |\det \partial f_T(x_s, s) / \partial x_s|.

A conditional transporter (:attr:`~trajflow.transporters.Transporter.is_conditional`) gets the condition
and ``drop_cond`` as the predictor does, but never guided: only the predictor's Gaussian is.

Shapes: ``event_shape = (T + 1, *data_shape)``, ordered from the cleanest level (index 0) to noise
(index T); ``batch_shape`` is the broadcast of the condition's, the grid's and ``drop_cond``'s batch shapes.

References:
    | Normalizing Trajectory Models (Gu et al., 2026). https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..checks import check_event_shape, check_finite, check_grid, check_number, check_tensor
from ..conditioning import Condition, align_cond, cat_cond, check_cond, check_drop_cond, map_cond
from ..guidance import guided_gaussian
from ..likelihood.bounds import LikelihoodBounds
from ..numerics import upcast
from ..predictors.base import Predictor
from ..process import MarkovInterpolant
from ..transporters.base import Transporter
from .chain import ReverseChain, _module_device, _module_dtype, _std_normal_log_prob, _sum_event, check_compatible

__all__ = ["TrajectoryDistribution"]


def _check_guidance(guidance: object, predictor: Predictor, cond: Condition | None) -> None:
    """A finite weight >= 0; a positive one needs a conditional predictor and a condition."""
    if check_number("guidance", guidance, low=0) > 0 and (predictor.cond_event_dims is None or cond is None):
        got = "an unconditional predictor" if predictor.cond_event_dims is None else "cond=None"
        raise ValueError(f"guidance: classifier-free guidance needs a condition and a conditional predictor, got {got}")


def _batch_shape(grid: Tensor, cond_batch: torch.Size, drop_cond: Tensor | None) -> torch.Size:
    """The broadcast batch shape of the grid, the condition and the dropout mask."""
    try:
        return torch.broadcast_shapes(grid.shape[:-1], cond_batch, drop_cond.shape if drop_cond is not None else ())
    except RuntimeError as e:
        raise ValueError(
            f"grid/cond/drop_cond: batch shapes do not broadcast: grid {tuple(grid.shape[:-1])}, "
            f"cond {tuple(cond_batch)}, drop_cond {None if drop_cond is None else tuple(drop_cond.shape)}"
        ) from e


class TrajectoryDistribution(LikelihoodBounds, ReverseChain, Distribution):
    r"""The exact density of whole trajectories :math:`(x_{t_0}, \dots, x_{t_T})` under an NTM.

    Arguments:
        transporter: The shared invertible map :math:`f_T(x, t)`.
        predictor: The network giving :math:`(\mu_P, \sigma_P)` of each step.
        grid: Ascending times :math:`t_0 < \dots < t_T = 1`, shape ``(T + 1,)`` or ``(*batch, T + 1)``.
        cond: The condition (class indices, vectors, or a tuple such as text features and mask) with
            leading batch dims, or ``None`` for the null condition.
        guidance: Classifier-free guidance weight :math:`w \geq 0` (clipped Gaussian rule,
            :func:`trajflow.guidance.guided_gaussian`). Every guided step is still a Gaussian in
            transporter space, so the guided trajectory keeps an exact density.
        drop_cond: Optional bool mask (broadcast to the batch) of examples whose condition is replaced by
            the predictor's learned null condition (guidance dropout during training).
        temperature: :math:`\tau > 0` multiplies every step's scale, :math:`\sigma_P \to \tau \sigma_P` (after
            guidance), in sampling and in the densities alike: the tempered trajectory distribution, exact as
            the untempered one. :math:`\tau < 1` draws each step closer to its mean, a flow's reduced-temperature
            sampling (Kingma & Dhariwal, 2018, Glow) taken per step; :math:`\tau > 1` widens each step, as
            DDPM's larger reverse variance does (Ho et al., 2020, §3.2): a posterior sampler's scale leaves out
            the error of its mean. The prior :math:`x_{t_T} \sim \mathcal{N}(0, I)` stays untempered.
        validate_args: Check the values of the grid and of the inputs of the densities (finiteness,
            ranges), and that a log-density computed from finite inputs is not NaN. Shapes and dtypes are
            always checked. Defaults to ``True`` whatever torch's global flag (which importing zuko turns
            off); pass ``False`` in hot loops: these checks read values, a GPU synchronisation each.

    Inputs of the densities may be of any real dtype, cast to the networks' (bool and complex are refused);
    an empty batch gives an empty result without calling the networks. A term of :meth:`log_prob` that
    overflows to :math:`-\infty` (e.g. a level of magnitude 1e30) makes the log-density :math:`-\infty`,
    its correctly rounded value, since every other term is bounded above, whatever NaN the networks give
    elsewhere; a NaN that remains is refused under ``validate_args`` with a ``ValueError`` naming ``traj``.

    Example:
        >>> import trajflow
        >>> model = trajflow.NTM(trajflow.transporters.ZukoTransporter(features=2),
        ...                      trajflow.predictors.MLPPredictor(features=2))
        >>> dist = model.distribution(trajflow.time_grid(4))
        >>> traj = dist.sample((3,))
        >>> traj.shape, dist.log_prob(traj).shape
        (torch.Size([3, 5, 2]), torch.Size([3]))
        >>> cold = model.distribution(trajflow.time_grid(4), temperature=0.5)  # every step's scale halved
        >>> bool((cold.log_prob(traj) != dist.log_prob(traj)).all())
        True
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # modules and a grid checked by check_grid
    has_rsample = True

    def __init__(
        self,
        transporter: Transporter,
        predictor: Predictor,
        grid: Tensor,
        cond: Condition | None = None,
        *,
        guidance: float = 0.0,
        drop_cond: Tensor | None = None,
        temperature: float = 1.0,
        validate_args: bool | None = None,
    ) -> None:
        check_compatible(transporter, predictor)
        temperature = check_number("temperature", temperature, positive=True)
        check_grid(grid, validate=validate_args is not False)  # the values only where validation is on
        _check_guidance(guidance, predictor, cond)
        # The one check of the condition, here where it enters (validate_args=False: shapes and types only).
        values = validate_args is not False
        cond_batch = check_cond(predictor, cond, validate=values)
        if transporter.is_conditional:
            check_cond(transporter, cond, cond_batch, validate=values)
        check_drop_cond(drop_cond)
        batch_shape = _batch_shape(grid, cond_batch, drop_cond)

        device = _module_device(predictor, transporter) or grid.device
        self._dtype = _module_dtype(predictor, transporter)
        self.transporter = transporter
        self.predictor = predictor
        self.grid = grid.to(device)
        self.cond = cond
        self.drop_cond = drop_cond
        self.guidance = float(guidance)
        self.temperature = temperature
        self.data_shape = torch.Size(transporter.event_shape)
        self.process = MarkovInterpolant(event_dim=len(self.data_shape))
        super().__init__(
            batch_shape,
            torch.Size((grid.shape[-1], *self.data_shape)),
            validate_args=True if validate_args is None else validate_args,
        )

    # -- torch.distributions plumbing -----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """The number of reverse steps :math:`T`."""
        return self.grid.shape[-1] - 1

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape: torch.Size, _instance: TrajectoryDistribution | None = None):
        new = self._get_checked_instance(TrajectoryDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.transporter, new.predictor = self.transporter, self.predictor
        new.grid = self.grid.expand(*batch_shape, self.steps + 1)
        new.cond = None
        if self.cond is not None:
            new.cond = map_cond(
                lambda c, ed: c.expand(*batch_shape, *c.shape[c.dim() - ed :]),
                self.cond,
                self.predictor.cond_event_dims,
            )
        new.drop_cond = None if self.drop_cond is None else self.drop_cond.expand(batch_shape)
        new.guidance, new.temperature = self.guidance, self.temperature
        new.data_shape, new.process = self.data_shape, self.process
        new._dtype = self._dtype
        super(TrajectoryDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        return (
            f"TrajectoryDistribution(steps={self.steps}, data_shape={tuple(self.data_shape)}, "
            f"batch_shape={tuple(self.batch_shape)}, guidance={self.guidance}, temperature={self.temperature})"
        )

    # -- the two networks, on flattened batches -------------------------------------------------------------

    @property
    def _reads_data(self) -> bool:
        """Whether the predictor reads :math:`x_t` rather than :math:`u_t` (its ``input_space``, checked by
        :func:`check_compatible`)."""
        return self.predictor.input_space == "data"

    @property
    def _data_dim(self) -> int:
        return len(self.data_shape)

    def _times(self, lead: torch.Size) -> Tensor:
        """The grid broadcast to ``(*lead, T + 1)``; ``lead`` ends with the batch shape."""
        return self.grid.expand(*lead, self.steps + 1)

    def _drop(self, lead: torch.Size, inner: int, device: torch.device, shape: int | torch.Size) -> Tensor | None:
        """``drop_cond`` broadcast over ``lead = (*sample, *batch, *inner dims)`` and reshaped to ``shape``."""
        if self.drop_cond is None:
            return None
        d = self.drop_cond.to(device)
        return d.reshape(*d.shape, *([1] * inner)).expand(lead).reshape(shape)

    def _transporter_args(
        self, lead: torch.Size, inner: int, device: torch.device, flat: bool = True
    ) -> tuple[Condition | None, Tensor | None]:
        """The transporter's ``(cond, drop_cond)`` for inputs of leading shape ``lead`` (as in :meth:`_predict`),
        flattened to ``lead.numel()`` (``flat``) or of batch shape ``lead``. ``(None, None)`` for an
        unconditional transporter or no condition (the null context). Never guided."""
        if not self.transporter.is_conditional or self.cond is None:
            return None, None
        event_dims = self.transporter.cond_event_dims
        cond = align_cond(self.cond, event_dims, lead, inner)  # type: ignore[arg-type]
        if not flat:
            cond = map_cond(lambda c, ed: c.reshape(*lead, *c.shape[c.dim() - ed :]), cond, event_dims)
        return cond, self._drop(lead, inner, device, lead.numel() if flat else lead)

    def _transport(self, x: Tensor, t: Tensor, inner: int = 0) -> tuple[Tensor, Tensor]:
        """``f_T`` on ``x`` of shape ``(*L, *data)`` at times ``t`` of shape ``L``.

        ``L = (*sample, *batch, *inner dims)``: the condition (if the transporter sees it) is broadcast over
        the sample dims on the left and the ``inner`` dims on the right (e.g. the level axis).
        """
        cond, drop = self._transporter_args(t.shape, inner, x.device)
        u, ladj = self.transporter(x.reshape(-1, *self.data_shape), t.reshape(-1), cond, drop)
        return u.reshape(x.shape), upcast(ladj).reshape(t.shape)

    def _inverse(self, u: Tensor, t: Tensor, inner: int = 0) -> Tensor:
        """``f_T^{-1}`` on ``u`` of shape ``(*L, *data)`` at times ``t`` of shape ``L`` (see :meth:`_transport`)."""
        cond, drop = self._transporter_args(t.shape, inner, u.device)
        x = self.transporter.inverse(u.reshape(-1, *self.data_shape), t.reshape(-1), cond, drop)
        return x.reshape(u.shape)

    def _predict(self, u_t: Tensor, t: Tensor, s: Tensor, inner: int) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` for ``u_t`` of shape ``(*L, *data)``; ``L = (*sample, *batch, *inner dims)``; sigma
        guided, then tempered: every density and sampler reads the step's Gaussian here."""
        lead = t.shape
        n = lead.numel()
        flat_u, flat_t, flat_s = u_t.reshape(n, *self.data_shape), t.reshape(n), s.reshape(n)
        cond = None if self.cond is None else align_cond(self.cond, self.predictor.cond_event_dims, lead, inner)
        drop = self._drop(lead, inner, flat_u.device, n)
        if self.guidance > 0:
            mu, sigma = self._guided(flat_u, flat_t, flat_s, cond, drop)
        else:
            mu, sigma = self.predictor(flat_u, flat_t, flat_s, cond, drop)
        if self.temperature != 1.0:
            sigma = sigma * self.temperature
        return mu.reshape(u_t.shape), sigma.reshape(u_t.shape)

    def _guided(
        self, u: Tensor, t: Tensor, s: Tensor, cond: Condition | None, drop: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The guided Gaussian in one batched pass: the first half conditional, the second null."""
        keep = drop if drop is not None else torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
        both = torch.cat([keep, torch.ones_like(keep)])
        mu, sigma = self.predictor(torch.cat([u, u]), torch.cat([t, t]), torch.cat([s, s]), cat_cond(cond, cond), both)
        (mu_c, mu_u), (sigma_c, sigma_u) = mu.chunk(2), sigma.chunk(2)
        return guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, self.guidance)

    # -- validation -------------------------------------------------------------------------------------------

    def _check_value(self, name: str, value: Tensor, event_shape: torch.Size) -> torch.Size:
        """Check ``value`` of shape ``(*lead, *event_shape)``; return ``lead`` broadcast with the batch."""
        check_event_shape(name, value, event_shape)
        if self._validate_args:
            check_finite(name, value)
        lead = value.shape[: value.dim() - len(event_shape)]
        try:
            return torch.broadcast_shapes(lead, self.batch_shape)
        except RuntimeError as e:
            raise ValueError(
                f"{name}: expected leading dims that broadcast with the distribution's batch_shape "
                f"{tuple(self.batch_shape)} (from its condition and grid), got leading shape {tuple(lead)} "
                f"(full shape {tuple(value.shape)})"
            ) from e

    def _as_input(self, name: str, value: Tensor) -> Tensor:
        """``value`` in the networks' dtype (any real dtype is accepted; bool and complex are refused)."""
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name}: expected a real-valued (floating-point or integer) tensor, got dtype {value.dtype}"
            )
        dtype = self._dtype or (value.dtype if value.is_floating_point() else torch.get_default_dtype())
        if value.dtype == dtype:
            return value
        cast = value.to(dtype)
        if self._validate_args:  # finite as given, but perhaps not in the model's dtype (1e300 in float32)
            check_finite(f"{name} (cast to {dtype})", cast)
        return cast

    def _check_computed(self, name: str, result: Tensor, value: Tensor) -> Tensor:
        """Refuse NaN in a log-density computed from (checked, finite) ``value``: the networks overflowed."""
        nan = torch.isnan(result)
        if bool(nan.any()):
            largest = float(value.detach().abs().max()) if value.numel() else 0.0
            raise ValueError(
                f"{name}: expected values the networks can evaluate in {value.dtype}, got finite values up to "
                f"|x| = {largest:.3g} for which they return NaN ({int(nan.sum())} of {nan.numel()} log-densities: "
                "an overflow on huge values, or non-finite weights); rescale the data, or use a float64 model"
            )
        return result

    # -- densities --------------------------------------------------------------------------------------------

    def log_prob_factors(self, value: Tensor) -> tuple[Tensor, Tensor]:
        r"""The prior term and the T step terms of :meth:`log_prob`.

        Returns:
            ``log N(x_{t_T}; 0, I)`` of shape ``lead`` and :math:`\log p(x_{t_{k-1}} | x_{t_k})` for
            ``k = 1..T`` stacked as shape ``(*lead, T)``, in float32 (or wider). Under ``validate_args`` a
            NaN term (the networks overflowed on huge finite values) is refused with a ``ValueError``.
        """
        prior, factors = self._log_prob_terms(value)
        if self._validate_args:
            self._check_computed("traj", factors, value)
            self._check_computed("traj", prior, value)
        return prior, factors

    def _log_prob_terms(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`log_prob_factors` without the check of its result."""
        lead = self._check_value("traj", value, self.event_shape)
        value = self._as_input("traj", value)
        T, dd = self.steps, self._data_dim
        if lead.numel() == 0:
            dtype = torch.promote_types(value.dtype, torch.float32)
            return value.new_zeros(lead, dtype=dtype), value.new_zeros(*lead, T, dtype=dtype)
        x = value.expand(*lead, *self.event_shape)
        level = len(lead)
        times = self._times(lead)  # (*lead, T+1)
        x_lo, x_T = x.narrow(level, 0, T), x.narrow(level, T, 1)
        # All levels below T go through the transporter in one batch; level T (t = 1) is skipped.
        u_lo, ladj = self._transport(x_lo, times[..., :T], inner=1)  # (*lead, T, *data), (*lead, T)
        if self._reads_data:
            reads = x.narrow(level, 1, T)  # x_{t_1..t_T}
        else:
            reads = torch.cat([u_lo.narrow(level, 1, T - 1), x_T], dim=level)  # u_{t_1..t_T}
        mu, sigma = self._predict(reads, times[..., 1:], times[..., :T], inner=1)
        z = (upcast(u_lo) - upcast(mu)) / sigma
        factors = _std_normal_log_prob(z, dd) - _sum_event(torch.log(sigma), dd) + ladj
        prior = _std_normal_log_prob(x_T.squeeze(level), dd)
        return prior, factors

    def log_prob(self, value: Tensor) -> Tensor:
        r"""Exact :math:`\log p(x_{t_0}, \dots, x_{t_T})` of trajectories ``(*lead, T + 1, *data)``.

        Returns shape ``lead`` broadcast with the batch; :math:`-\infty` where a term overflowed to
        :math:`-\infty` (see the class docstring), never NaN for finite input under ``validate_args``.
        """
        prior, factors = self._log_prob_terms(value)
        total = prior + factors.sum(-1)
        # Each term is bounded above (Gaussian log-densities with a floored scale, bounded log-determinants),
        # so one term below the float range puts the sum there too, whatever NaN another term holds.
        ninf = (prior == -math.inf) | (factors == -math.inf).any(-1)
        pinf = (prior == math.inf) | (factors == math.inf).any(-1)
        total = torch.where(ninf & ~pinf, torch.full_like(total, -math.inf), total)
        if self._validate_args:
            self._check_computed("traj", total, value)
        return total

    def pair_log_prob(self, value: Tensor, k: Tensor) -> Tensor:
        r""":math:`\log p(x_{t_{k-1}} | x_{t_k})` for one step ``k`` per trajectory (pair-wise training).

        Arguments:
            value: Trajectories, shape ``(*lead, T + 1, *data)``.
            k: Step indices in ``1..T``, an integer tensor broadcastable to ``lead``.

        Returns:
            The log-densities, shape ``lead``; only two levels per trajectory go through the networks. Under
            ``validate_args`` a NaN (the networks overflowed on huge finite values) is refused with a
            ``ValueError`` naming ``traj``.
        """
        lead = self._check_value("traj", value, self.event_shape)
        value = self._as_input("traj", value)
        k = self._step_indices(k, lead, value.device)
        if lead.numel() == 0:
            return value.new_zeros(lead, dtype=torch.promote_types(value.dtype, torch.float32))
        dd = self._data_dim
        x = value.expand(*lead, *self.event_shape)
        times = self._times(lead)
        idx = k.reshape(*lead, 1, *([1] * dd)).expand(*lead, 1, *self.data_shape)
        x_t = x.gather(len(lead), idx).squeeze(len(lead))
        x_s = x.gather(len(lead), idx - 1).squeeze(len(lead))
        t = times.gather(-1, k[..., None]).squeeze(-1)
        s = times.gather(-1, k[..., None] - 1).squeeze(-1)
        if self._reads_data:
            (u_s, ladj_s), reads = self._transport(x_s, s), x_t
        else:
            both, ladj = self._transport(torch.stack([x_s, x_t]), torch.stack([s, t]))
            u_s, ladj_s = both[0], ladj[0]
            top = (t == 1.0).reshape(*lead, *([1] * dd))
            reads = torch.where(top, x_t, both[1])  # the transporter is skipped at t = 1
        mu, sigma = self._predict(reads, t, s, inner=0)
        z = (upcast(u_s) - upcast(mu)) / sigma
        result = _std_normal_log_prob(z, dd) - _sum_event(torch.log(sigma), dd) + ladj_s
        return self._check_computed("traj", result, value) if self._validate_args else result

    def _step_indices(self, k: Tensor, lead: torch.Size, device: torch.device) -> Tensor:
        """``k`` checked (integers in ``1..T``, the range with ``validate_args``) and broadcast to ``lead``."""
        T = self.steps
        k = check_tensor("k", k).to(device=device)
        if k.is_floating_point() or k.dtype == torch.bool or k.is_complex():
            raise ValueError(f"k: expected integer step indices in 1..{T}, got dtype {k.dtype}")
        if self._validate_args and (bool((k < 1).any()) or bool((k > T).any())):
            raise ValueError(f"k: expected integer step indices in 1..{T}, got {k.tolist()}")
        try:
            return k.long().expand(lead)
        except RuntimeError as e:
            raise ValueError(f"k: expected a shape that broadcasts to {tuple(lead)}, got {tuple(k.shape)}") from e
