"""Reference ``emr_statistics``: EMR's elect, mask and rescale statistics (Huang et al., 2024, as
FusionBench 0.2.33 computes them), float32 arithmetic (float64 for float64 inputs):

    τᵢ = xᵢ − base;  σ = sign(Σᵢ τᵢ) with a zero sum counted as −1;
    unified = σ · maxᵢ |τᵢ| over the τᵢ with τᵢ·σ > 0 (0 where none);  maskᵢ = τᵢ·σ > 0;
    sums[i] = (Σ |τᵢ|, Σ |maskᵢ · unified|)   (float64)
"""

from __future__ import annotations

import torch

from .weighted_sum import accumulation_dtype


def emr_statistics(base: torch.Tensor, xs: list[torch.Tensor]):
    acc = accumulation_dtype(base.dtype)
    taus = torch.stack([x.to(acc) - base.to(acc) for x in xs])
    sign = torch.where(taus.sum(0) > 0, 1.0, -1.0).to(acc)
    agree = taus * sign > 0
    unified = torch.where(agree, taus.abs(), 0).amax(0) * sign
    flat = (taus.abs().reshape(len(xs), -1), (unified * agree).abs().reshape(len(xs), -1))
    sums = torch.stack([f.sum(1, dtype=torch.float64) for f in flat], dim=1)
    return unified.to(base.dtype), agree, sums
