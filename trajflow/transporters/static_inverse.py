r"""The transformer transporter's inverse captured in CUDA graphs: :class:`StaticCacheInverse`.

Eagerly, the token-by-token inverse is bound by kernel launches (``blocks x (L - 1) x layers_per_block``
small kernels, about 1.2 ms per token step whatever the batch; ``docs/performance.md``). Its static-cache
form (:meth:`~trajflow.transporters.transformer.TransformerTransporter.decode_static`) has fixed shapes and
no host synchronisation, so the whole decode is captured **once per batch size** in one
:class:`torch.cuda.CUDAGraph` and replayed: one launch per call.

Argument checks, patchify, time features and the condition context run outside the graph. The first call
for a key ``(N, dtypes, device, autocast state)`` allocates static inputs, warms up on a side stream (as
:func:`torch.cuda.graph` requires) and captures, with autocast re-entered with ``cache_enabled=False``;
each call then copies its inputs in, replays and clones the output. The graph reads the parameters'
memory: a parameter *replaced* (``.to(dtype)``, new ``.data``) triggers a new capture, while in-place
updates (an optimizer step, ``load_state_dict``) are seen by the next replay.

Example (CUDA only)::

    f = TransformerTransporter(cfg).cuda().eval()
    inverse = StaticCacheInverse(f)          # or f.inverse(u, t, method="graph")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        x = inverse(u, t)                    # captures for this batch size, then replays
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..nn.patches import unpatchify

__all__ = ["StaticCacheInverse", "graphed_inverse", "check_no_grad"]


class StaticDecoder(Protocol):
    """What the graphed inverse needs of a :class:`~trajflow.transporters.transformer.TransformerTransporter`
    (whose module imports this one)."""

    config: Any
    event_shape: torch.Size

    def _prepare(
        self, name: str, x: Tensor, t: Tensor, cond: Any = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, torch.Size]: ...

    def decode_static(self, z: Tensor, emb: Tensor, ctx: Tensor | None = None) -> Tensor: ...


def check_no_grad(u: Tensor, t: Tensor, method: str) -> None:
    """Raise if a gradient is asked of a static-cache inverse (in-place cache writes; sampling only)."""
    if torch.is_grad_enabled() and (u.requires_grad or t.requires_grad):
        raise ValueError(
            f"u: method={method!r} has no gradient (in-place static cache), but u or t requires grad; "
            "use method='kv-cache' to differentiate through the inverse, or run under torch.no_grad()"
        )


@dataclass
class _Captured:
    """One captured decode: the graph, its static inputs and output, and the parameter addresses it read."""

    graph: torch.cuda.CUDAGraph
    z: Tensor  # (N, L, D) static input tokens
    emb: Tensor  # (N, time_features) static time features
    ctx: Tensor | None  # (N, width) static condition context (conditional transporters only)
    out: Tensor  # (N, L, D) static output tokens
    addresses: tuple[int, ...]


def _addresses(module: torch.nn.Module) -> tuple[int, ...]:
    """Data pointers of every parameter and buffer (a replaced tensor changes them)."""
    return tuple(p.data_ptr() for p in module.parameters()) + tuple(b.data_ptr() for b in module.buffers())


class StaticCacheInverse:
    r"""Inverse of a :class:`~trajflow.transporters.transformer.TransformerTransporter` from CUDA graphs.

    ``inverse(u, t, cond=None, drop_cond=None)`` returns ``transporter.inverse(u, t, cond, drop_cond)`` up
    to float rounding. One graph per ``(batch size, dtypes, device, autocast state)`` is kept (its memory
    pool too) until :meth:`reset` or until this object is dropped.

    Arguments:
        transporter: The transporter, on a CUDA device.
        warmup: Eager runs on a side stream before each capture (at least 1).

    Raises:
        ValueError: On a call whose ``u`` is not on a CUDA device (CUDA graphs do not exist on the CPU; use
            ``transporter.inverse(u, t, method="static")`` there), or when ``u`` or ``t`` requires grad
            under grad mode (the graph has no backward).
    """

    def __init__(self, transporter: StaticDecoder, *, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: expected at least 1 eager run before a capture, got {warmup}")
        self._transporter = weakref.ref(transporter)  # no reference cycle through the registry below
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}

    @property
    def transporter(self) -> StaticDecoder:
        f = self._transporter()
        if f is None:
            raise RuntimeError("StaticCacheInverse: its transporter has been garbage-collected")
        return f

    @property
    def num_graphs(self) -> int:
        """How many graphs are held (one per batch size / dtype / autocast state seen)."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory."""
        self._graphs.clear()

    def __call__(self, u: Tensor, t: Tensor, cond=None, drop_cond: Tensor | None = None) -> Tensor:
        f = self.transporter
        if u.device.type != "cuda":
            raise ValueError(
                f"u: a CUDA graph inverse needs a CUDA tensor, got one on {u.device}; "
                "use method='static' (same fixed-shape decode, eager) or 'kv-cache' on this device"
            )
        check_no_grad(u, t, "graph")
        # checks, patchify, time features, condition context: outside the graph
        z, emb, ctx, _ = f._prepare("u", u, t, cond, drop_cond)
        with torch.no_grad():
            out = self._replay(f, z, emb, ctx)
        return unpatchify(out, f.config.patch_size, f.event_shape).reshape(u.shape)

    def _replay(self, f: StaticDecoder, z: Tensor, emb: Tensor, ctx: Tensor | None = None) -> Tensor:
        device = z.device
        autocast = torch.is_autocast_enabled("cuda")
        autocast_dtype = torch.get_autocast_dtype("cuda") if autocast else None
        ctx_dtype = None if ctx is None else ctx.dtype
        key = (tuple(z.shape), z.dtype, emb.dtype, ctx_dtype, device, autocast, autocast_dtype)
        addresses = _addresses(f)
        captured = self._graphs.get(key)
        if captured is None or captured.addresses != addresses:
            self._graphs.pop(key, None)  # free the stale graph's pool before capturing again
            captured = self._capture(f, z, emb, ctx, autocast_dtype, addresses)
            self._graphs[key] = captured
        captured.z.copy_(z)
        captured.emb.copy_(emb)
        if captured.ctx is not None:
            captured.ctx.copy_(ctx)
        captured.graph.replay()
        return captured.out.clone()

    def _capture(
        self,
        f: StaticDecoder,
        z: Tensor,
        emb: Tensor,
        ctx: Tensor | None,
        autocast_dtype: torch.dtype | None,
        addresses: tuple[int, ...],
    ) -> _Captured:
        device = z.device

        def amp():
            if autocast_dtype is None:
                return nullcontext()
            return torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False)

        static_z, static_emb = z.clone(), emb.clone()
        static_ctx = None if ctx is None else ctx.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), amp():
            for _ in range(self.warmup):
                f.decode_static(static_z, static_emb, static_ctx)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), amp():
            out = f.decode_static(static_z, static_emb, static_ctx)
        return _Captured(graph, static_z, static_emb, static_ctx, out, addresses)


# One helper per transporter for ``inverse(..., method="graph")``; weak keys, so a transporter that is
# dropped takes its graphs with it (the helper holds only a weak reference back).
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_inverse(transporter: StaticDecoder) -> StaticCacheInverse:
    """The :class:`StaticCacheInverse` that ``transporter.inverse(u, t, method="graph")`` uses (made once)."""
    helper = _REGISTRY.get(transporter)
    if helper is None:
        helper = StaticCacheInverse(transporter)
        _REGISTRY[transporter] = helper
    return helper
