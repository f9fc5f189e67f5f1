r"""Adapter: any external velocity model ``fn(x_t, t, cond)`` as a trajflow velocity model."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..checks import check_count, check_tensor
from ..conditioning import Condition, EventDims, map_cond
from ..nn.embeddings import SinusoidalEmbedding
from ..nn.patches import check_image_config, default_layout, hidden_shape, to_tokens, token_dim
from .base import VelocityModel

__all__ = ["CallableVelocity"]


def _checked_event_shape(event_shape: int | Sequence[int], patch_size: int) -> torch.Size:
    shape = torch.Size((event_shape,) if isinstance(event_shape, int) else event_shape)
    if len(shape) == 0 or min(shape) < 1:
        raise ValueError(f"event_shape: expected a non-empty shape of positive sizes, got {tuple(shape)}")
    if len(shape) == 3:
        check_image_config(shape, patch_size)
    return shape


def _cond_without_null(cond: Condition | None, drop_cond: Tensor | None) -> Condition | None:
    if drop_cond is None or not bool(drop_cond.any()):
        return cond
    if bool(drop_cond.all()):
        return None
    raise ValueError(
        "drop_cond: this CallableVelocity has no null_cond, so it cannot drop the condition "
        "of some examples only; pass null_cond=... (one condition without batch dims)"
    )


class CallableVelocity(VelocityModel):
    r"""Adapter: an external velocity model ``fn(x_t, t, cond)`` as a trajflow velocity model.

    ``fn`` follows trajflow's convention, :math:`x_t = (1 - t) x_0 + t \epsilon` with :math:`t \in [0, 1]`
    (1 is noise) and :math:`v = \epsilon - x_0` (wrap other conventions inside ``fn``); calls are flat,
    ``x_t`` ``(N, *event_shape)``, ``t`` ``(N,)``. An :class:`torch.nn.Module` ``fn`` is registered (so
    fine-tuned, and deep-copied into the mean-alignment reference); a plain function keeps what it closes
    over frozen and shared (a warning says so). It cannot be saved with ``save_pretrained`` (a
    ``TypeError`` names the part): save the state dict and rebuild ``fn`` in code.

    Arguments:
        fn: The velocity model.
        event_shape: Shape of one data point.
        hidden_features: Width of the hidden states ``fn`` returns with ``v``, ``(N, F)`` (``"flat"``) or
            ``(N, L, F)`` per patch token (``"tokens"``, the raster order of :func:`trajflow.nn.patchify`);
            ``None``: ``fn`` returns ``v`` only, and the adapter makes its own hidden states
            ``SiLU(W [x_t, emb(t)])`` of width ``feature_width`` (per token for images).
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
        self.event_shape = _checked_event_shape(event_shape, patch_size)
        self.hidden_layout = hidden_layout or default_layout(self.event_shape)
        if self.hidden_layout not in ("flat", "tokens"):
            raise ValueError(f"hidden_layout: expected 'flat' or 'tokens', got {self.hidden_layout!r}")
        self.patch_size = patch_size
        self.cond_event_dims = cond_event_dims
        self.null_cond = null_cond
        self._set_fn(fn)
        self.returns_hidden = hidden_features is not None
        if self.returns_hidden:
            self.hidden_features = check_count("hidden_features", hidden_features)
        else:
            self._add_features(time_features, feature_width)

    def _set_fn(self, fn: Callable[..., Tensor | tuple[Tensor, Tensor]]) -> None:
        """``fn`` as a submodule, or (not an ``nn.Module``) as a plain attribute, with a warning."""
        if isinstance(fn, nn.Module):
            self.fn = fn
            return
        warnings.warn(
            "CallableVelocity: fn is not an nn.Module, so its parameters are not registered: the "
            "backbone stays frozen and is shared with any deep copy (the mean-alignment reference)",
            stacklevel=3,
        )
        object.__setattr__(self, "fn", fn)  # not a submodule

    def _add_features(self, time_features: int, feature_width: int) -> None:
        """The hidden state of a ``fn`` that returns none: a linear layer over the input and a time embedding."""
        self.time = SinusoidalEmbedding(time_features)
        flat = self.event_shape.numel()
        in_features = flat if self.hidden_layout == "flat" else token_dim(self.event_shape, self.patch_size)
        self.features = nn.Sequential(nn.Linear(in_features + time_features, feature_width), nn.SiLU())
        self.hidden_features = feature_width

    def _cond_for_fn(self, cond: Condition | None, drop_cond: Tensor | None, n: int) -> Condition | None:
        """Replace dropped rows by ``null_cond`` (without one: ``None`` for an all-null batch)."""
        if self.null_cond is None:
            return _cond_without_null(cond, drop_cond)
        ced = self.cond_event_dims if self.cond_event_dims is not None else 0
        null = map_cond(lambda c, ed: c.expand(n, *c.shape), self.null_cond, ced)
        if cond is None or drop_cond is None:
            return null if cond is None else cond
        single = isinstance(cond, Tensor)
        parts = [(cond, null, ced)] if single else zip(cond, null, ced)  # type: ignore[arg-type]
        out = [torch.where(drop_cond.reshape(n, *([1] * ed)).to(c.device), z.to(c), c) for c, z, ed in parts]
        return out[0] if single else tuple(out)

    def _split_output(self, out: object) -> tuple[Tensor, Tensor | None]:
        """``fn``'s output as ``(v, hidden)``, ``hidden`` ``None`` for a ``fn`` that returns ``v`` only."""
        pair = isinstance(out, (tuple, list)) and len(out) == 2
        if not pair and not isinstance(out, Tensor):
            raise ValueError(
                f"velocity model output: expected a tensor v or a pair (v, hidden), got {type(out).__name__}"
            )
        if pair and not self.returns_hidden:
            raise ValueError(
                "velocity model output: expected v only since hidden_features=None, got a pair; pass "
                "hidden_features=<width of hidden> to use the model's own hidden states"
            )
        if not pair and self.returns_hidden:
            raise ValueError(
                f"velocity model output: expected (v, hidden) since hidden_features={self.hidden_features}, "
                f"got a single tensor of shape {tuple(out.shape)}; pass hidden_features=None for a "  # type: ignore[union-attr]
                "model that returns v only"
            )
        return tuple(out) if pair else (out, None)  # type: ignore[return-value]

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(v, hidden)``: ``v`` of ``x_t``'s shape and ``hidden`` ``(N, F)`` or ``(N, L, F)``."""
        n = x_t.shape[0]
        v, hidden = self._split_output(self.fn(x_t, t, self._cond_for_fn(cond, drop_cond, n)))
        check_tensor("velocity model output", v)
        if v.shape != x_t.shape:
            raise ValueError(
                f"velocity model output: expected v of shape {tuple(x_t.shape)} (N, *event_shape) with "
                f"event_shape={tuple(self.event_shape)}, got {tuple(v.shape)}"
            )
        if hidden is None:
            return v, self._own_hidden(x_t, t)
        check_tensor("velocity model hidden", hidden)
        want = hidden_shape(self.hidden_layout, n, self.event_shape, self.patch_size, self.hidden_features)
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
        tokens = to_tokens(x_t, self.event_shape, self.patch_size)  # (N, L, D)
        temb = temb[:, None].expand(-1, tokens.shape[1], -1)
        return self.features(torch.cat([tokens, temb], dim=-1))
