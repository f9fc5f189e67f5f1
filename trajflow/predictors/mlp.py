r"""An MLP predictor for vector data: :math:`(u_t, t, s, y) \mapsto (\mu_P, \sigma_P)`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..checkpoint import Pretrained
from ..checks import check_number, check_times
from ..nn.mlp import MLPTrunk, zero_linear
from ..nn.scale import positive_scale
from .base import Predictor


class MLPPredictor(MLPTrunk, Pretrained, Predictor):
    r"""A residual MLP that predicts the Gaussian of :math:`u_s` given :math:`u_t`, the times and a condition.

    The head is zero-initialised, so at initialisation :math:`\mu_P = u_t` and :math:`\sigma_P = 1`.
    The mean is residual (:math:`\mu_P = u_t + \delta`) and the scale is soft-clipped
    (:func:`trajflow.nn.positive_scale`).

    Arguments:
        features: Dimension of the data vectors.
        num_classes: Number of classes of an integer condition ``(*batch,)``, or ``None``.
        cond_features: Width of a vector condition ``(*batch, cond_features)``, or 0.
        width: Hidden width.
        depth: Number of residual blocks.
        time_features: Size of each sinusoidal time embedding (of :math:`t` and of :math:`s`), even.
        scale_bound: Soft-clip bound of the raw scale; :math:`\sigma \geq \approx e^{-\text{bound}}`.
        validate_args: Check in :meth:`forward` that the times ``t`` and ``s`` are finite and in [0, 1]
            (reads their values: a GPU synchronisation). Not part of the saved config.

    Example:
        >>> import torch
        >>> P = MLPPredictor(features=2, num_classes=3)
        >>> mu, sigma = P(torch.randn(5, 2), torch.full((5,), 0.5), torch.full((5,), 0.25),
        ...               torch.tensor([0, 1, 2, 0, 1]))
        >>> mu.shape, sigma.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        features: int,
        *,
        num_classes: int | None = None,
        cond_features: int = 0,
        width: int = 256,
        depth: int = 3,
        time_features: int = 64,
        scale_bound: float = 8.0,
        validate_args: bool = True,
    ) -> None:
        check_number("scale_bound", scale_bound, positive=True)
        super().__init__(
            features,
            2,
            num_classes=num_classes,
            cond_features=cond_features,
            width=width,
            depth=depth,
            time_features=time_features,
            validate_args=validate_args,
        )
        self.head = zero_linear(width, 2 * features)
        self.scale_bound = scale_bound

    def config_dict(self) -> dict[str, Any]:
        """The constructor's arguments (see :meth:`~trajflow.checkpoint.Pretrained.save_pretrained`)."""
        return {**super().config_dict(), "scale_bound": self.scale_bound}

    def hidden(
        self, u_t: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None
    ) -> Tensor:
        """The backbone's hidden state ``(N, width)`` before the head."""
        return self._hidden(u_t, (t, s), cond, drop_cond)

    def forward(
        self, u_t: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` for ``u_t`` ``(N, features)`` at times ``t``, ``s`` ``(N,)``; with
        ``validate_args``, times outside [0, 1] or NaN are refused with a ``ValueError`` naming them."""
        if self.validate_args:
            check_times("t", t)
            check_times("s", s)
        delta, raw = self.head(self.hidden(u_t, t, s, cond, drop_cond)).chunk(2, dim=-1)
        return u_t + delta, positive_scale(raw, self.scale_bound)
