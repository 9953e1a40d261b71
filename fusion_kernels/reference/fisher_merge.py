"""Reference ``fisher_merge`` (Matena & Raffel, 2022), accumulated in float32 (float64 for float64):

out = Σᵢ wᵢ·Fᵢ·xᵢ / (Σᵢ wᵢ·Fᵢ + eps)      where Σᵢ wᵢ·Fᵢ ≠ 0
out = Σᵢ wᵢ·xᵢ / Σᵢ wᵢ                    where Σᵢ wᵢ·Fᵢ = 0 (no model has Fisher mass there)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weighted_sum import accumulation_dtype


def fisher_merge(
    xs: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor], weights: Sequence[float], eps: float = 0.0
) -> torch.Tensor:
    acc_dtype = accumulation_dtype(xs[0].dtype)
    total = sum(weights)
    num = torch.zeros(xs[0].shape, dtype=acc_dtype, device=xs[0].device)
    den = torch.zeros_like(num)
    avg = torch.zeros_like(num)
    for x, f, w in zip(xs, fisher, weights, strict=True):
        wf = f.to(acc_dtype) * w
        x32 = x.to(acc_dtype)
        num.addcmul_(wf, x32)
        den.add_(wf)
        avg.add_(x32, alpha=w / total)
    return torch.where(den != 0, num / (den + eps), avg).to(xs[0].dtype)
