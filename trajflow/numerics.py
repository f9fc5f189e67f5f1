"""Numerical precision policy: log-densities and log-determinants are computed in float32 or wider.

Under bf16/fp16 autocast the networks run in half precision, but sums over thousands of dimensions of
log-scales must not; float64 inputs (used by the exactness tests) stay float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["upcast"]


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half-precision float, unchanged otherwise.

    Example:
        >>> upcast(torch.ones(2, dtype=torch.bfloat16)).dtype, upcast(torch.ones(2, dtype=torch.float64)).dtype
        (torch.float32, torch.float64)
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
