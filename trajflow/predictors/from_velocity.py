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

``s = 0`` (the cleanest level with :math:`t_{\min} = 0`) gives :math:`C = 0`, a point mass whose
log-density is undefined. The scale is therefore floored at ``c_min`` (default ``1e-3``): the model stays a
proper flow for every grid, and for :math:`C \geq c_{\min}` (any :math:`s \gtrsim c_{\min}`) it is exactly
the posterior above. ``c_min=0`` switches the floor off; then ``s = 0`` raises a :class:`ValueError`
(train with ``TrajectoryNLL(t_min=(low > 0, high))`` in that case).

:class:`CallableVelocity` adapts an external velocity model (any callable ``fn(x_t, t, cond)``) to the
:class:`~trajflow.velocity.VelocityModel` calling convention.

References:
    | Normalizing Trajectory Models (Gu et al., 2026), §3.3, Eqs. 3.6-3.8, App. A.3.
    | https://arxiv.org/abs/2605.08078
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Pretrained, build_part, check_config_keys, part_config
from ..checks import check_number, check_tensor, check_time_features, check_times
from ..conditioning import Condition, EventDims, cond_batch_shape, map_cond
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.patches import patchify, unpatchify
from ..nn.scale import soft_clip
from ..numerics import upcast
from ..process import MarkovInterpolant
from ..velocity import VelocityModel
from .base import Predictor

__all__ = ["FlowMatchingPredictor", "CallableVelocity"]


def _attr_chain(module: nn.Module, *names: str) -> object | None:
    """The first of ``module.name`` or ``module.config.name`` that exists and is not None."""
    config = getattr(module, "config", None)
    for name in names:
        for owner in (module, config):
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None:
                return value
    return None


def _default_layout(event_shape: torch.Size) -> str:
    """``"flat"`` hidden states ``(N, F)`` for vectors, ``"tokens"`` ``(N, L, F)`` for images/sequences."""
    return "flat" if len(event_shape) == 1 else "tokens"


def _token_dim(event_shape: torch.Size, patch_size: int) -> int:
    """Channels per token: ``C p^2`` for ``(C, H, W)`` images, ``C`` for ``(L, C)`` sequences."""
    if len(event_shape) == 3:
        return event_shape[0] * patch_size**2
    if len(event_shape) == 2:
        return event_shape[1]
    raise ValueError(f"hidden_layout: 'tokens' needs a (L, C) or (C, H, W) event shape, got {tuple(event_shape)}")


def _num_tokens(event_shape: torch.Size, patch_size: int) -> int:
    if len(event_shape) == 3:
        return event_shape[1] * event_shape[2] // patch_size**2
    return event_shape[0]


def _to_tokens(x: Tensor, event_shape: torch.Size, patch_size: int) -> Tensor:
    """``(N, *event) -> (N, L, token_dim)``."""
    return patchify(x, patch_size) if len(event_shape) == 3 else x


def _from_tokens(tokens: Tensor, event_shape: torch.Size, patch_size: int) -> Tensor:
    """``(N, L, token_dim) -> (N, *event)``; the inverse of :func:`_to_tokens`."""
    return unpatchify(tokens, patch_size, event_shape) if len(event_shape) == 3 else tokens


class CallableVelocity(VelocityModel):
    r"""Adapter: an external velocity model ``fn(x_t, t, cond)`` as a trajflow velocity model.

    ``fn`` must follow trajflow's convention: :math:`x_t = (1 - t) x_0 + t \epsilon` with
    :math:`t \in [0, 1]` (1 is noise) and :math:`v = \epsilon - x_0`. Wrap models with another time
    scale or sign inside ``fn``. Calls are flat: ``x_t`` ``(N, *event_shape)``, ``t`` ``(N,)``.

    * ``hidden_features`` given: ``fn`` returns ``(v, hidden)`` with ``hidden`` ``(N, hidden_features)``
      (``hidden_layout="flat"``) or ``(N, L, hidden_features)`` per token (``"tokens"``; ``L`` patch tokens
      of size ``patch_size`` for images, in the raster order of :func:`trajflow.nn.patches.patchify`).
    * ``hidden_features=None``: ``fn`` returns ``v`` only. The adapter then makes its own hidden states,
      a small learnable layer ``SiLU(W [x_t, emb(t)])`` of width ``feature_width`` (per token for images),
      on which the predictor puts its zero-initialised head.

    Pass an :class:`torch.nn.Module` as ``fn`` to fine-tune it: its parameters are registered here (and
    copied by :func:`copy.deepcopy`, which makes the frozen reference of the mean-alignment loss). A plain
    function keeps whatever it closes over frozen and shared (a warning says so).

    It cannot be saved with ``save_pretrained`` (no config describes arbitrary code): saving a model that
    holds one raises a ``TypeError`` naming the part; save the state dict and rebuild ``fn`` in code.

    Arguments:
        fn: The velocity model.
        event_shape: Shape of one data point.
        hidden_features: Width of the hidden states ``fn`` returns, or ``None`` if it returns ``v`` only.
        cond_event_dims: Trailing dims of one condition (0 class index, 1 vector, a tuple for tuples), or
            ``None`` for an unconditional model.
        hidden_layout: ``"flat"`` or ``"tokens"``; defaults to flat for vectors, tokens otherwise.
        patch_size: Patch side of the token layout of images.
        null_cond: One condition (no batch dims) given to ``fn`` where ``drop_cond`` is True or ``cond`` is
            None; without it, ``fn`` receives ``cond=None`` for an all-null batch and a partly dropped
            batch raises.
        time_features: Size of the time embedding of the adapter's own hidden states.
        feature_width: Width of the adapter's own hidden states.

    Example:
        >>> class External(nn.Module):  # any model with its own calling convention
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        ...     def forward(self, x, t, cond):
        ...         return self.net(x)
        >>> velocity = CallableVelocity(External(), (2,))
        >>> v, h = velocity(torch.randn(3, 2), torch.rand(3))
        >>> v.shape, h.shape
        (torch.Size([3, 2]), torch.Size([3, 128]))
    """

    def __init__(
        self,
        fn: Callable[..., Tensor | tuple[Tensor, Tensor]],
        event_shape: int | Sequence[int],
        hidden_features: int | None = None,
        cond_event_dims: EventDims | None = None,
        *,
        hidden_layout: str | None = None,
        patch_size: int = 1,
        null_cond: Condition | None = None,
        time_features: int = 32,
        feature_width: int = 128,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"fn: expected a callable velocity model, got {type(fn).__name__}")
        if isinstance(event_shape, int):
            event_shape = (event_shape,)
        self.event_shape = torch.Size(event_shape)
        if len(self.event_shape) == 0 or min(self.event_shape) < 1:
            raise ValueError(f"event_shape: expected a non-empty shape of positive sizes, got {tuple(event_shape)}")
        self.hidden_layout = hidden_layout or _default_layout(self.event_shape)
        if self.hidden_layout not in ("flat", "tokens"):
            raise ValueError(f"hidden_layout: expected 'flat' or 'tokens', got {self.hidden_layout!r}")
        if len(self.event_shape) == 3:
            _, h, w = self.event_shape
            if patch_size < 1 or h % patch_size or w % patch_size:
                raise ValueError(f"patch_size: expected a positive divisor of H={h} and W={w}, got {patch_size}")
        self.patch_size = patch_size
        self.cond_event_dims = cond_event_dims
        self.null_cond = null_cond
        if isinstance(fn, nn.Module):
            self.fn = fn
        else:
            warnings.warn(
                "CallableVelocity: fn is not an nn.Module, so its parameters are not registered: the "
                "backbone stays frozen and is shared with any deep copy (the mean-alignment reference)",
                stacklevel=2,
            )
            object.__setattr__(self, "fn", fn)  # not a submodule
        self.returns_hidden = hidden_features is not None
        if hidden_features is not None:
            if not isinstance(hidden_features, int) or hidden_features < 1:
                raise ValueError(f"hidden_features: expected a positive integer or None, got {hidden_features!r}")
            self.hidden_features = hidden_features
        else:
            self.time = SinusoidalEmbedding(time_features)
            in_features = (
                self.event_shape.numel() if self.hidden_layout == "flat" else _token_dim(self.event_shape, patch_size)
            )
            self.features = nn.Sequential(nn.Linear(in_features + time_features, feature_width), nn.SiLU())
            self.hidden_features = feature_width

    def check_cond(self, cond: Condition | None) -> torch.Size:
        """The batch shape of ``cond`` (``()`` for None); raises for a condition of an unconditional model."""
        if cond is None:
            return torch.Size()
        if self.cond_event_dims is None:
            raise ValueError("cond: this velocity model is unconditional (cond_event_dims=None), expected cond=None")
        return cond_batch_shape(cond, self.cond_event_dims)

    def _cond_for_fn(self, cond: Condition | None, drop_cond: Tensor | None, n: int) -> Condition | None:
        """Replace dropped rows by ``null_cond`` (or pass ``None`` for an all-null batch)."""
        if self.null_cond is None:
            if drop_cond is not None and bool(drop_cond.any()):
                if bool(drop_cond.all()):
                    return None
                raise ValueError(
                    "drop_cond: this CallableVelocity has no null_cond, so it cannot drop the condition "
                    "of some examples only; pass null_cond=... (one condition without batch dims)"
                )
            return cond
        ced = self.cond_event_dims if self.cond_event_dims is not None else 0
        null = map_cond(lambda c, ed: c.expand(n, *c.shape), self.null_cond, ced)
        if cond is None:
            return null
        if drop_cond is None:
            return cond

        def pick(pair: tuple[Tensor, Tensor], ed: int) -> Tensor:
            c, z = pair
            return torch.where(drop_cond.reshape(n, *([1] * ed)).to(c.device), z.to(c), c)

        if isinstance(cond, Tensor):
            return pick((cond, null), ced)  # type: ignore[arg-type]
        return tuple(pick((c, z), ed) for c, z, ed in zip(cond, null, ced))  # type: ignore[arg-type]

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape and ``hidden`` ``(N, F)`` or ``(N, L, F)``."""
        n = x_t.shape[0]
        out = self.fn(x_t, t, self._cond_for_fn(cond, drop_cond, n))
        if isinstance(out, Tensor):
            if self.returns_hidden:
                raise ValueError(
                    f"velocity model output: expected (v, hidden) since hidden_features={self.hidden_features}, "
                    f"got a single tensor of shape {tuple(out.shape)}; pass hidden_features=None for a "
                    "model that returns v only"
                )
            v, hidden = out, None
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            if not self.returns_hidden:
                raise ValueError(
                    "velocity model output: expected v only since hidden_features=None, got a pair; pass "
                    "hidden_features=<width of hidden> to use the model's own hidden states"
                )
            v, hidden = out
        else:
            raise ValueError(
                f"velocity model output: expected a tensor v or a pair (v, hidden), got {type(out).__name__}"
            )
        check_tensor("velocity model output", v)
        if v.shape != x_t.shape:
            raise ValueError(
                f"velocity model output: expected v of shape {tuple(x_t.shape)} (N, *event_shape) with "
                f"event_shape={tuple(self.event_shape)}, got {tuple(v.shape)}"
            )
        if hidden is None:
            return v, self._own_hidden(x_t, t)
        check_tensor("velocity model hidden", hidden)
        if self.hidden_layout == "flat":
            want: tuple[int, ...] = (n, self.hidden_features)
        else:
            want = (n, _num_tokens(self.event_shape, self.patch_size), self.hidden_features)
        if tuple(hidden.shape) != want:
            raise ValueError(
                f"velocity model hidden: expected shape {want} ({self.hidden_layout} layout, "
                f"hidden_features={self.hidden_features}), got {tuple(hidden.shape)}"
            )
        return v, hidden

    def _own_hidden(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``SiLU(W [x_t, emb(t)])``: ``(N, feature_width)`` or ``(N, L, feature_width)``."""
        temb = self.time(t).to(x_t.dtype)  # (N, time_features)
        if self.hidden_layout == "flat":
            return self.features(torch.cat([x_t.flatten(1), temb], dim=-1))
        tokens = _to_tokens(x_t, self.event_shape, self.patch_size)  # (N, L, D)
        temb = temb[:, None].expand(-1, tokens.shape[1], -1)
        return self.features(torch.cat([tokens, temb], dim=-1))


class FlowMatchingPredictor(Pretrained, Predictor):
    r"""The NTM predictor :math:`(\mu_P, \sigma_P)` of a flow-matching velocity model (NTM Eqs. 3.6-3.8).

    See the module docstring for the equations. At initialisation :math:`\mu_P = A u_t + B (u_t - t v)`
    and :math:`\sigma_P = \max(C, c_{\min})` exactly.

    Arguments:
        velocity: A velocity model ``(x_t, t, cond, drop_cond) -> (v, hidden)`` with ``event_shape`` and
            ``cond_event_dims`` attributes: :class:`~trajflow.velocity.MLPVelocity`,
            :class:`~trajflow.predictors.transformer.TransformerVelocity` or :class:`CallableVelocity`.
            It is used (and trained) as is; make a frozen copy first if you need one.
        hidden_features: Width of ``hidden``; read from the velocity model (``hidden_features``, ``width``
            or ``config.width``) when omitted.
        hidden_layout: ``"flat"`` (``(N, F)``) or ``"tokens"`` (``(N, L, F)``, mapped back to the image with
            the patch size, as :func:`trajflow.nn.patches.unpatchify` does); read from the model or
            defaulted (flat for vectors).
        patch_size: Patch side of the token layout; read from the model (``patch_size`` or
            ``config.patch_size``), else 1.
        c_min: Floor of the posterior scale :math:`C`; ``0`` disables it (then ``s = 0`` raises).
        delta_mean: Also learn a zero-initialised residual on the mean, :math:`\mu_P = \mu_{post} + \delta_\mu`
            (the paper's ``no_delta_mean = 1`` corresponds to the default ``False``).
        time_features: Size of the sinusoidal embeddings of ``t`` and ``s`` fed to the head (0: the head
            sees ``hidden`` only, as in the paper).
        delta_bound: Soft-clip bound of :math:`\delta_\sigma` (so :math:`e^{-a} \leq \sigma_P / C \leq e^a`).
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
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(velocity, nn.Module) or not hasattr(velocity, "event_shape"):
            raise ValueError(
                f"velocity: expected a velocity nn.Module with an event_shape (wrap other callables in "
                f"CallableVelocity), got {type(velocity).__name__}"
            )
        if not (isinstance(c_min, (int, float)) and math.isfinite(c_min) and c_min >= 0):
            raise ValueError(f"c_min: expected a finite number >= 0, got {c_min!r}")
        check_number("delta_bound", delta_bound, positive=True)
        if not isinstance(time_features, int) or isinstance(time_features, bool) or time_features < 0:
            raise ValueError(f"time_features: expected 0 or an even integer >= 2, got {time_features!r}")
        if time_features:
            check_time_features("time_features", time_features)
        self.validate_args = bool(validate_args)
        self.velocity = velocity
        self.event_shape = torch.Size(velocity.event_shape)
        self.cond_event_dims = getattr(velocity, "cond_event_dims", None)
        if hidden_features is None:
            hidden_features = _attr_chain(velocity, "hidden_features", "width")  # type: ignore[assignment]
        if not isinstance(hidden_features, int) or hidden_features < 1:
            raise ValueError(
                f"hidden_features: could not read a positive width from {type(velocity).__name__} "
                f"(hidden_features / width / config.width); pass hidden_features=..., got {hidden_features!r}"
            )
        self.hidden_features = hidden_features
        layout = hidden_layout or _attr_chain(velocity, "hidden_layout") or _default_layout(self.event_shape)
        if layout not in ("flat", "tokens"):
            raise ValueError(f"hidden_layout: expected 'flat' or 'tokens', got {layout!r}")
        self.hidden_layout = layout
        self.patch_size = int(patch_size or _attr_chain(velocity, "patch_size") or 1)  # type: ignore[arg-type]
        self.c_min = float(c_min)
        self.delta_mean = bool(delta_mean)
        self.delta_bound = float(delta_bound)
        self.time_features = int(time_features)
        if self.time_features:
            self.time = SinusoidalEmbedding(self.time_features)
        out = self.event_shape.numel() if layout == "flat" else _token_dim(self.event_shape, self.patch_size)
        self.num_outputs = 2 if self.delta_mean else 1
        self.head = nn.Linear(hidden_features + 2 * self.time_features, self.num_outputs * out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config_dict(self) -> dict[str, Any]:
        """The velocity model as a part (:func:`~trajflow.checkpoint.part_config`) and the resolved settings.

        A velocity model that cannot be rebuilt from a config (a :class:`CallableVelocity` wraps arbitrary
        code) gives a ``TypeError`` naming ``velocity``.
        """
        return {
            "velocity": part_config(self.velocity, "velocity"),
            "hidden_features": self.hidden_features,
            "hidden_layout": self.hidden_layout,
            "patch_size": self.patch_size,
            "c_min": self.c_min,
            "delta_mean": self.delta_mean,
            "time_features": self.time_features,
            "delta_bound": self.delta_bound,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchingPredictor:
        """An untrained predictor from :meth:`config_dict`'s output (unknown fields are refused by name)."""
        check_config_keys(cls, config)
        if "velocity" not in config:
            raise ValueError(f"config: expected a 'velocity' part, got fields {sorted(config)}")
        settings = {k: v for k, v in config.items() if k != "velocity"}
        return cls(build_part(config["velocity"], "velocity"), **settings)

    def check_cond(self, cond: Condition | None) -> torch.Size:
        """Validate ``cond`` with the velocity model's own checks where it has them; return its batch shape."""
        checker = getattr(self.velocity, "check_cond", None)
        if callable(checker):
            return checker(cond)
        batch = super().check_cond(cond)
        condition = getattr(self.velocity, "condition", None)
        if cond is not None and condition is not None and hasattr(condition, "check"):
            condition.check(cond)
        return batch

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

    def _delta(self, hidden: Tensor, t: Tensor, s: Tensor, n: int) -> Tensor:
        """The head's output ``(N, num_outputs, *event)``, zero at initialisation."""
        layout = self.hidden_layout
        want = 2 if layout == "flat" else 3
        if hidden.dim() != want or hidden.shape[0] != n or hidden.shape[-1] != self.hidden_features:
            shape = "(N, F)" if layout == "flat" else "(N, L, F)"
            raise ValueError(
                f"velocity model hidden: expected {shape} with N={n}, F={self.hidden_features} "
                f"({layout} layout), got {tuple(hidden.shape)}"
            )
        if layout == "tokens" and hidden.shape[1] != _num_tokens(self.event_shape, self.patch_size):
            raise ValueError(
                f"velocity model hidden: expected {_num_tokens(self.event_shape, self.patch_size)} tokens for "
                f"event shape {tuple(self.event_shape)} with patch_size={self.patch_size}, got "
                f"{hidden.shape[1]} (shape {tuple(hidden.shape)})"
            )
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
        return torch.stack([_from_tokens(p, self.event_shape, self.patch_size) for p in parts], dim=1)

    def forward(
        self,
        u_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None = None,
        drop_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(mu, sigma)`` of :math:`p(u_s | u_t, y)`, each of ``u_t``'s shape (float32 or wider).

        With ``validate_args``, times ``t`` or ``s`` outside [0, 1] or NaN are refused with a ``ValueError``
        naming them."""
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
