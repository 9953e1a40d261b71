"""Reference ``task_arithmetic``: out = base + Σᵢ wᵢ·(xᵢ − base), accumulated in float32 (float64 for float64)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weighted_sum import accumulation_dtype


def task_arithmetic(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    acc_dtype = accumulation_dtype(base.dtype)
    b = base.to(acc_dtype)
    acc = b.clone()
    for x, w in zip(xs, weights, strict=True):
        acc.add_(x.to(acc_dtype) - b, alpha=w)
    return acc.to(base.dtype)
