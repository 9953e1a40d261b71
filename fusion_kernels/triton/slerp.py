"""Triton ``slerp``: per-row sums of a², b² and a·b per block (summed over blocks in float64 on the
host, in block order), the coefficients in float64, then one combine launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, store_rounded


@triton.jit
def _dots_kernel(a, b, partial, cols, blocks, BLOCK: tl.constexpr):
    row, block = tl.program_id(1).to(tl.int64), tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(a + row * cols + offs, mask=mask, other=0).to(tl.float32)
    y = tl.load(b + row * cols + offs, mask=mask, other=0).to(tl.float32)
    at = partial + (row * blocks + block) * 3
    tl.store(at, tl.sum(x * x, axis=0))
    tl.store(at + 1, tl.sum(y * y, axis=0))
    tl.store(at + 2, tl.sum(x * y, axis=0))


@triton.jit
def _combine_kernel(out, a, b, coef_a, coef_b, cols, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(a + row * cols + offs, mask=mask).to(tl.float32)
    y = tl.load(b + row * cols + offs, mask=mask).to(tl.float32)
    store_rounded(out + row * cols, offs, tl.load(coef_a + row) * x + tl.load(coef_b + row) * y, mask)


def slerp(out, a, b, t: list[float], rowwise: bool, dot_threshold: float, eps: float) -> None:
    rows = a.shape[0] if rowwise else 1
    cols = a.numel() // rows if rows else 0
    if a.numel() == 0:
        return
    blocks = triton.cdiv(cols, BLOCK)
    partial = torch.empty(rows, blocks, 3, dtype=torch.float32, device=a.device)
    _dots_kernel[(blocks, rows)](a, b, partial, cols, blocks, BLOCK=BLOCK)
    xx, yy, xy = partial.double().sum(1).unbind(1)
    na = torch.where(xx.sqrt() > eps, xx.sqrt(), 1.0)
    nb = torch.where(yy.sqrt() > eps, yy.sqrt(), 1.0)
    dot = (xy / (na * nb)).clamp(-1, 1)
    ts = torch.tensor(t, dtype=torch.float64, device=a.device).expand(rows)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    coef_a = torch.where(linear, 1 - ts, torch.sin((1 - ts) * theta) / sin_theta).float()
    coef_b = torch.where(linear, ts, torch.sin(ts * theta) / sin_theta).float()
    _combine_kernel[(blocks, rows)](out, a, b, coef_a, coef_b, cols, BLOCK=BLOCK)
