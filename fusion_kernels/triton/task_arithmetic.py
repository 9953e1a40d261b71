"""Triton ``task_arithmetic``: out = base + Σᵢ wᵢ·(xᵢ − base) (``add_base=False``: the sum alone) in one
launch, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, grid, offsets, store_rounded


@triton.jit
def _task_arithmetic_kernel(out, base, xs, ws, numel, N: tl.constexpr, ADD_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = offsets(numel, BLOCK)
    b = tl.load(base + offs, mask=mask).to(tl.float32)
    acc = b if ADD_BASE else tl.zeros_like(b)
    for i in tl.static_range(N):
        acc = tl.fma(tl.load(xs[i] + offs, mask=mask).to(tl.float32) - b, ws[i], acc)  # as torch's add(alpha=)
    store_rounded(out, offs, acc, mask)


def task_arithmetic(
    out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], add_base: bool
) -> None:
    if out.numel():
        _task_arithmetic_kernel[grid(out.numel())](
            out, base, tuple(xs), tuple(weights), out.numel(), N=len(xs), ADD_BASE=add_base, BLOCK=BLOCK
        )
