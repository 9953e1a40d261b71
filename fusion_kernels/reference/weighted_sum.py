"""Reference ``weighted_sum``: out = Σᵢ wᵢ·xᵢ, accumulated in float32 (float64 for float64 inputs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    acc_dtype = accumulation_dtype(xs[0].dtype)
    acc = xs[0].to(acc_dtype) * weights[0]  # not zeros + ...: -0.0 must stay -0.0
    for x, w in zip(xs[1:], weights[1:], strict=True):
        acc.add_(x.to(acc_dtype), alpha=w)
    return acc.to(xs[0].dtype)
