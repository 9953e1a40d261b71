"""Triton ``fisher_merge``: Σ wᵢFᵢxᵢ / (Σ wᵢFᵢ + eps), or Σ wᵢxᵢ / Σ wᵢ where Σ wᵢFᵢ = 0; one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, grid, offsets, store_rounded


@triton.jit
def _fisher_merge_kernel(out, xs, fs, ws, avg_ws, eps, numel, N: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = offsets(numel, BLOCK)
    num = tl.zeros((BLOCK,), dtype=tl.float32)
    den = tl.zeros((BLOCK,), dtype=tl.float32)
    avg = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(xs[i] + offs, mask=mask).to(tl.float32)
        wf = tl.load(fs[i] + offs, mask=mask).to(tl.float32) * ws[i]
        num += wf * x
        den += wf
        avg += x * avg_ws[i]
    store_rounded(out, offs, tl.where(den != 0, num / (den + eps), avg), mask)


def fisher_merge(
    out: torch.Tensor, xs: list[torch.Tensor], fisher: list[torch.Tensor], weights: list[float], eps: float
) -> None:
    total = sum(weights)
    if out.numel():
        _fisher_merge_kernel[grid(out.numel())](
            out,
            tuple(xs),
            tuple(fisher),
            tuple(weights),
            tuple(w / total for w in weights),
            eps,
            out.numel(),
            N=len(xs),
            BLOCK=BLOCK,
        )
