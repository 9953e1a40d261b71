"""Reference ``slerp``: spherical linear interpolation, accumulated in float32 (float64 for float64).

Rows are the whole tensor (``rowwise=False``) or its slices along dim 0 (``rowwise=True``,
mergekit 0.1.5's SLERP). For each row pair (a, b) with interpolation factor t:

    â = a/‖a‖, b̂ = b/‖b‖   (a norm ≤ eps counts as 1);   d = clamp(â·b̂, −1, 1)
    |d| > dot_threshold:    out = (1 − t)·a + t·b                       (nearly parallel: linear)
    otherwise, θ = acos d:  out = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

The coefficients multiply the original (unnormalised) a and b.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weighted_sum import accumulation_dtype


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: Sequence[float], *, rowwise: bool, dot_threshold: float, eps: float
) -> torch.Tensor:
    """``t``: one factor, or one per row when ``rowwise``."""
    acc = accumulation_dtype(a.dtype)
    rows = a.shape[0] if rowwise else 1
    x = a.reshape(rows, -1).to(acc)
    y = b.reshape(rows, -1).to(acc)
    ts = torch.tensor(list(t), dtype=acc, device=a.device).reshape(-1, 1).expand(rows, 1)
    if x.shape[1] == 0:
        return ((1 - ts) * x + ts * y).reshape(a.shape).to(a.dtype)
    norm_x = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    norm_y = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    norm_x = torch.where(norm_x > eps, norm_x, 1.0)
    norm_y = torch.where(norm_y > eps, norm_y, 1.0)
    dot = ((x / norm_x) * (y / norm_y)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.sin(theta)
    coef_x = torch.where(linear, 1 - ts, torch.sin((1 - ts) * theta) / sin_theta)
    coef_y = torch.where(linear, ts, torch.sin(ts * theta) / sin_theta)
    return (coef_x * x + coef_y * y).reshape(a.shape).to(a.dtype)
