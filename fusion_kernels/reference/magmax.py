"""Reference ``magmax`` (MagMax, Marczak et al., 2024), float32 arithmetic (float64 for float64):

τᵢ = xᵢ − base;  per element τ* = the τᵢ of largest |τᵢ| (a later model wins a tie);
out = base + λ·τ*
"""

from __future__ import annotations

import torch

from .weighted_sum import accumulation_dtype


def magmax(base: torch.Tensor, xs: list[torch.Tensor], lam: float) -> torch.Tensor:
    acc = accumulation_dtype(base.dtype)
    b = base.to(acc)
    best = xs[0].to(acc) - b
    for x in xs[1:]:
        tau = x.to(acc) - b
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return (b + best * lam).to(base.dtype)
