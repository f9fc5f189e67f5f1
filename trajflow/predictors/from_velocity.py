r"""An NTM predictor initialised from a pretrained flow-matching velocity model (NTM §3.3, method.md 3.4).

The velocity backbone is reinterpreted as acting in transporter space. Given :math:`(u_t, t)` it yields a
velocity :math:`v` and hidden states :math:`h`, and the predictor's Gaussian is the flow-matching
model's own DDPM-style posterior:

.. math::

    \hat u_0 = u_t - t v, \qquad
    \mu_P = A(t, s) u_t + B(t, s) \hat u_0, \qquad
    \sigma_P = \max(C(t, s), c_{\min}) \exp(\delta_\sigma),

with :math:`(A, B, C)` from :meth:`trajflow.MarkovInterpolant.posterior` and :math:`\delta_\sigma` a
**zero-initialised** head on :math:`h` (plus sinusoidal features of :math:`t` and :math:`s`, since the
backbone never sees :math:`s`). At initialisation :math:`\sigma_P = C`, so an NTM whose transporter is the
identity *is* the velocity model's Gaussian posterior sampler (see :mod:`trajflow.finetune`).

``s = 0`` gives :math:`C = 0`, a point mass without a density, so the scale is floored at ``c_min``: the
model is a proper flow for every grid, and exactly the posterior wherever :math:`C \geq c_{\min}`.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3, Eqs. 3.6-3.8, App. A.3.
    | https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained, build_part, check_config_keys, part_config
from ..checks import check_number, check_time_features, check_times
from ..conditioning import Condition, CondSpec, cond_spec_of
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.mlp import zero_linear
from ..nn.patches import default_layout, from_tokens, hidden_shape, token_dim
from ..nn.scale import soft_clip
from ..numerics import upcast
from ..process import MarkovInterpolant
from .base import INPUT_SPACES, Predictor

__all__ = ["FlowMatchingPredictor"]


def _attr_chain(module: nn.Module, *names: str) -> object | None:
    """The first of ``module.name`` or ``module.config.name`` that exists and is not None."""
    owners = (module, getattr(module, "config", None))
    values = (getattr(owner, name, None) for name in names for owner in owners)
    return next((v for v in values if v is not None), None)


def _check_settings(
    velocity: object, c_min: object, delta_bound: object, time_features: object, input_space: object
) -> None:
    """The checks of :class:`FlowMatchingPredictor`'s arguments that need nothing read from the model."""
    if input_space not in INPUT_SPACES:
        raise ValueError(f"input_space: expected one of {INPUT_SPACES}, got {input_space!r}")
    if not isinstance(velocity, nn.Module) or not hasattr(velocity, "event_shape"):
        raise ValueError(
            f"velocity: expected a velocity nn.Module with an event_shape (wrap other callables in "
            f"CallableVelocity), got {type(velocity).__name__}"
        )
    check_number("c_min", c_min, low=0)
    check_number("delta_bound", delta_bound, positive=True)
    if time_features != 0 or isinstance(time_features, bool):  # 0: no time features
        check_time_features("time_features", time_features)


def _hidden_form(
    velocity: nn.Module, hidden_features: int | None, hidden_layout: str | None, patch_size: int | None
) -> tuple[int, str, int]:
    """``(hidden_features, hidden_layout, patch_size)`` of the velocity model's ``hidden``: as given, else read
    from the model, else the defaults (flat for vectors, patch size 1)."""
    features = _attr_chain(velocity, "hidden_features", "width") if hidden_features is None else hidden_features
    if not isinstance(features, int) or features < 1:
        raise ValueError(
            f"hidden_features: could not read a positive width from {type(velocity).__name__} "
            f"(hidden_features / width / config.width); pass hidden_features=..., got {features!r}"
        )
    layout = hidden_layout or _attr_chain(velocity, "hidden_layout") or default_layout(velocity.event_shape)
    if layout not in ("flat", "tokens"):
        raise ValueError(f"hidden_layout: expected 'flat' or 'tokens', got {layout!r}")
    return features, layout, int(patch_size or _attr_chain(velocity, "patch_size") or 1)  # type: ignore[arg-type]


class FlowMatchingPredictor(Pretrained, Predictor):
    r"""The NTM predictor :math:`(\mu_P, \sigma_P)` of a flow-matching velocity model (NTM Eqs. 3.6-3.8).

    At initialisation :math:`\mu_P = A u_t + B (u_t - t v)` and :math:`\sigma_P = \max(C, c_{\min})` exactly.

    Arguments:
        velocity: A velocity model ``(x_t, t, cond, drop_cond) -> (v, hidden)`` with ``event_shape`` and
            ``cond_event_dims`` attributes: :class:`~trajflow.velocity.MLPVelocity`,
            :class:`~trajflow.velocity.TransformerVelocity` or :class:`~trajflow.velocity.CallableVelocity`.
            It is used (and trained) as is; make a frozen copy first if you need one.
        hidden_features: Width of ``hidden``; read from the velocity model (``hidden_features``, ``width``
            or ``config.width``) when omitted.
        hidden_layout: ``"flat"`` (``(N, F)``) or ``"tokens"`` (``(N, L, F)``, unpatchified); read from the
            model, else flat for vectors.
        patch_size: Patch side of the token layout; read from the model (``patch_size`` or
            ``config.patch_size``), else 1.
        c_min: Floor of the posterior scale :math:`C`; ``0`` disables it (then ``s = 0`` raises: train with
            ``TrajectoryNLL(t_min=(low > 0, high))``).
        delta_mean: Also learn a zero-initialised residual on the mean, :math:`\mu_P = \mu_{post} + \delta_\mu`
            (the paper's ``no_delta_mean = 1`` corresponds to the default ``False``).
        time_features: Size of the sinusoidal embeddings of ``t`` and ``s`` fed to the head (0: the head
            sees ``hidden`` only, as in the paper).
        delta_bound: Soft-clip bound of :math:`\delta_\sigma` (so :math:`e^{-a} \leq \sigma_P / C \leq e^a`).
        input_space: ``"transported"`` (the paper's: the backbone reads :math:`u_t` as if it were
            :math:`x_t`) or ``"data"`` (it reads :math:`x_t`, the input it was trained on; the mean is still
            used in transporter space). See :attr:`~trajflow.predictors.Predictor.input_space`.
        validate_args: Check in :meth:`forward` that the times ``t`` and ``s`` are finite and in [0, 1] (reads
            their values: a GPU synchronisation); the velocity model checks its own input. Not part of the
            saved config.

    Example:
        >>> from trajflow.velocity import MLPVelocity
        >>> P = FlowMatchingPredictor(MLPVelocity(features=2, width=32))
        >>> u, t, s = torch.randn(4, 2), torch.full((4,), 0.5), torch.full((4,), 0.25)
        >>> mu, sigma = P(u, t, s)
        >>> A, B, C = MarkovInterpolant.posterior(t, s)
        >>> torch.allclose(sigma, C[:, None].expand(4, 2))
        True
    """

    def __init__(
        self,
        velocity: nn.Module,
        *,
        hidden_features: int | None = None,
        hidden_layout: str | None = None,
        patch_size: int | None = None,
        c_min: float = 1e-3,
        delta_mean: bool = False,
        time_features: int = 16,
        delta_bound: float = 6.0,
        input_space: str = "transported",
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        _check_settings(velocity, c_min, delta_bound, time_features, input_space)
        self.input_space = input_space
        self.validate_args = bool(validate_args)
        self.velocity = velocity
        self.event_shape = torch.Size(velocity.event_shape)
        self.cond_event_dims = getattr(velocity, "cond_event_dims", None)
        self.hidden_features, self.hidden_layout, self.patch_size = _hidden_form(
            velocity, hidden_features, hidden_layout, patch_size
        )
        self.c_min = float(c_min)
        self.delta_mean = bool(delta_mean)
        self.delta_bound = float(delta_bound)
        self.time_features = int(time_features)
        if self.time_features:
            self.time = SinusoidalEmbedding(self.time_features)
        flat = self.hidden_layout == "flat"
        out = self.event_shape.numel() if flat else token_dim(self.event_shape, self.patch_size)
        self.num_outputs = 2 if self.delta_mean else 1
        self.head = zero_linear(self.hidden_features + 2 * self.time_features, self.num_outputs * out)

    def config_dict(self) -> dict[str, Any]:
        """The velocity model as a part (:func:`~trajflow.checkpoint.part_config`; a ``TypeError`` naming
        ``velocity`` for a :class:`CallableVelocity`) and the resolved settings."""
        return {
            "velocity": part_config(self.velocity, "velocity"),
            "hidden_features": self.hidden_features,
            "hidden_layout": self.hidden_layout,
            "patch_size": self.patch_size,
            "c_min": self.c_min,
            "delta_mean": self.delta_mean,
            "time_features": self.time_features,
            "delta_bound": self.delta_bound,
            "input_space": self.input_space,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchingPredictor:
        """An untrained predictor from :meth:`config_dict`'s output (unknown fields are refused by name)."""
        check_config_keys(cls, config)
        if "velocity" not in config:
            raise ValueError(f"config: expected a 'velocity' part, got fields {sorted(config)}")
        settings = {k: v for k, v in config.items() if k != "velocity"}
        return cls(build_part(config["velocity"], "velocity"), **settings)

    @property
    def cond_spec(self) -> CondSpec | None:
        """The velocity model's condition (its ``cond_spec``, or one known by its ``cond_event_dims``)."""
        return cond_spec_of(self.velocity)

    def posterior_scale(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, B, max(C, c_min))`` of shape ``t.shape``; raises for ``C = 0`` when ``c_min = 0``."""
        A, B, C = MarkovInterpolant.posterior(t, s, validate=False)  # no device sync on the hot path
        if self.c_min > 0:
            return A, B, C.clamp_min(self.c_min)
        if bool((C <= 0).any()):
            raise ValueError(
                f"s: FlowMatchingPredictor with c_min=0 needs s > 0 (C(t, 0) = 0 is a point mass without a "
                f"density), got min(s)={float(s.min()):.3g}; train with t_min > 0, e.g. "
                "TrajectoryNLL(t_min=(0.001, 0.05)), or set c_min > 0"
            )
        return A, B, C

    def _check_hidden(self, hidden: Tensor, n: int) -> None:
        """Raise unless the velocity model's ``hidden`` has the layout, batch, width and tokens expected."""
        want = hidden_shape(self.hidden_layout, n, self.event_shape, self.patch_size, self.hidden_features)
        if tuple(hidden.shape) != want:
            raise ValueError(
                f"velocity model hidden: expected shape {want} ({self.hidden_layout} layout, hidden_features="
                f"{self.hidden_features}, patch_size={self.patch_size}), got {tuple(hidden.shape)}"
            )

    def _delta(self, hidden: Tensor, t: Tensor, s: Tensor, n: int) -> Tensor:
        """The head's output ``(N, num_outputs, *event)``, zero at initialisation."""
        layout = self.hidden_layout
        self._check_hidden(hidden, n)
        feats = hidden
        if self.time_features:
            ts = torch.cat([self.time(t), self.time(s)], dim=-1).to(hidden.dtype)  # (N, 2 F_t)
            if layout == "tokens":
                ts = ts[:, None].expand(-1, hidden.shape[1], -1)
            feats = torch.cat([hidden, ts], dim=-1)
        raw = self.head(feats)
        if layout == "flat":
            return raw.reshape(n, self.num_outputs, *self.event_shape)
        parts = raw.chunk(self.num_outputs, dim=-1)  # (N, L, D) each
        return torch.stack([from_tokens(p, self.event_shape, self.patch_size) for p in parts], dim=1)

    def forward(
        self,
        u_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(mu, sigma)`` of :math:`p(u_s | u_t, y)`, each of ``u_t``'s shape (float32 or wider); with
        ``validate_args``, times outside [0, 1] or NaN are refused with a ``ValueError`` naming them."""
        if self.validate_args:
            check_times("t", t)
            check_times("s", s)
        n = u_t.shape[0]
        v, hidden = self.velocity(u_t, t, cond, drop_cond)
        if v.shape != u_t.shape:
            raise ValueError(
                f"velocity model output: expected v of shape {tuple(u_t.shape)} (N, *event_shape) with "
                f"event_shape={tuple(self.event_shape)}, got {tuple(v.shape)}"
            )
        dtype = torch.promote_types(upcast(u_t).dtype, torch.float32)
        A, B, C = self.posterior_scale(t.to(dtype), s.to(dtype))
        expand = (n, *([1] * len(self.event_shape)))
        A, B, C = A.reshape(expand), B.reshape(expand), C.reshape(expand)
        u, v = u_t.to(dtype), v.to(dtype)
        u0_hat = u - t.to(dtype).reshape(expand) * v  # the clean estimate under x_t = (1 - t) x_0 + t eps
        mu = A * u + B * u0_hat
        delta = self._delta(hidden, t, s, n).to(dtype)  # (N, 1 or 2, *event)
        sigma = C * torch.exp(soft_clip(delta[:, -1], self.delta_bound))
        if self.delta_mean:
            mu = mu + delta[:, 0]
        return mu, sigma.expand_as(mu)
