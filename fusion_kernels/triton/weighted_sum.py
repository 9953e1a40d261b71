"""Triton ``weighted_sum``: out = Σᵢ wᵢ·xᵢ in one launch, accumulated in float32 in input order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, grid, offsets, store_rounded


@triton.jit
def _weighted_sum_kernel(out, xs, ws, numel, N: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = offsets(numel, BLOCK)
    acc = tl.load(xs[0] + offs, mask=mask).to(tl.float32) * ws[0]
    for i in tl.static_range(1, N):
        acc = tl.fma(tl.load(xs[i] + offs, mask=mask).to(tl.float32), ws[i], acc)  # as torch's add(alpha=)
    store_rounded(out, offs, acc, mask)


def weighted_sum(out: torch.Tensor, xs: list[torch.Tensor], weights: list[float]) -> None:
    if out.numel():
        _weighted_sum_kernel[grid(out.numel())](out, tuple(xs), tuple(weights), out.numel(), N=len(xs), BLOCK=BLOCK)
