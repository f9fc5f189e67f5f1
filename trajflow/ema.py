r"""An exponential moving average (EMA) of a model's parameters, kept in float32.

After every optimizer step, :meth:`EMA.update` moves each shadow tensor towards its parameter:

.. math:: \bar\theta \leftarrow \beta \bar\theta + (1 - \beta) \theta,
          \qquad \beta_n = \min\Big(\beta, \frac{1 + n}{10 + n}\Big) \text{ with warmup}

where ``n`` counts the updates so far (the TensorFlow/timm warmup: early averages follow a fresh model's fast
changes). Shadows are float32 on the parameters' device, so that updates of size ``1 - beta`` are not rounded
away in bf16; buffers are not averaged. Under FSDP the shadows are shards too, and :meth:`EMA.state_dict`
gathers full tensors (a collective: call it on every rank).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> ema = EMA(net, decay=0.5, warmup=False)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> ema.update(net)
    >>> torch.allclose(ema.shadow["weight"], net.weight - 0.5)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _full(t: Tensor) -> Tensor:
    """A DTensor shard gathered to its full value (a collective); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of the trainable parameters of a module.

    Arguments:
        model: The module whose parameters are averaged (its current values start the average).
        decay: The decay :math:`\\beta` in ``[0, 1)``; 0.999 averages over about 1,000 steps.
        warmup: Use :math:`\\min(\\beta, (1 + n) / (10 + n))` for the ``n``-th update.

    Attributes:
        shadow: ``{name: float32 tensor}``, the averages, keyed like ``model.named_parameters()``.
        num_updates: Updates so far (saved in :meth:`state_dict`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"model: expected the parameters this EMA was built on, missing {missing[:5]}{more}")
        return ((name, avg, params[name]) for name, avg in self.shadow.items())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters (call after each optimizer step)."""
        beta = self.current_decay()
        for _, avg, p in self._pairs(model):
            # lerp: avg + (1 - beta) (p - avg), in float32.
            avg.lerp_(p.detach().to(avg.dtype), 1.0 - beta)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages (cast to each parameter's dtype)."""
        for _, avg, p in self._pairs(model):
            p.copy_(avg.to(p.dtype))

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the averages into ``model`` (e.g. to sample from the EMA weights mid-training)."""
        backup = {name: p.detach().clone() for name, _, p in self._pairs(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, _, p in self._pairs(model):
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The averages as full float32 tensors, keyed by parameter name (the update count: :meth:`metadata`)."""
        return {name: _full(avg).detach().contiguous() for name, avg in self.shadow.items()}

    def metadata(self) -> dict[str, str]:
        """String metadata for the safetensors header: ``num_updates``, ``decay``, ``warmup``."""
        return {"num_updates": str(self.num_updates), "decay": repr(self.decay), "warmup": str(self.warmup)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
        """Load averages saved by :meth:`state_dict` (and the update count from :meth:`metadata`); a ``ValueError``
        names the keys or shapes that do not match."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"state: expected the EMA keys of this model; missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, avg in self.shadow.items():
            avg.copy_(_placed(name, state[name], avg))
        if metadata is not None and "num_updates" in metadata:
            self.num_updates = int(metadata["num_updates"])


def _placed(name: str, value: Tensor, avg: Tensor) -> Tensor:
    """``value`` on ``avg``'s device and dtype; for an FSDP shard ``avg``, only this rank's part of it."""
    if hasattr(avg, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(avg.device), avg.device_mesh, avg.placements)
    elif tuple(value.shape) != tuple(avg.shape):
        raise ValueError(f"state: expected {name} of shape {tuple(avg.shape)}, got {tuple(value.shape)}")
    return value.to(device=avg.device, dtype=avg.dtype)
