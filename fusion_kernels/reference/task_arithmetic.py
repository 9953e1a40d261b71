"""Reference ``task_arithmetic``: out = base + Σᵢ wᵢ·(xᵢ − base) (``add_base=False``: Σᵢ wᵢ·(xᵢ − base)
alone, the sum started from zero), accumulated in float32 (float64 for float64)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weighted_sum import accumulation_dtype


def task_arithmetic(
    base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], add_base: bool = True
) -> torch.Tensor:
    acc_dtype = accumulation_dtype(base.dtype)
    b = base.to(acc_dtype)
    acc = b.clone() if add_base else torch.zeros_like(b)
    for x, w in zip(xs, weights, strict=True):
        acc.add_(x.to(acc_dtype) - b, alpha=w)
    return acc.to(base.dtype)
