"""Triton ``sinkhorn``: the reference loop (:func:`fusion_kernels.reference.sinkhorn.iterate`) with
its two log-sum-exps and the plan as Triton kernels, each an online (running max) log-sum-exp:
one program per (matrix, row), or per (matrix, block of columns)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.sinkhorn import iterate

BLOCK = 256


@triton.jit
def _lse_rows_kernel(cost, g, out, n, m, inv_reg, BLOCK: tl.constexpr):
    row, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    c_row = cost + (b * n + row) * m
    best = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for start in range(0, m, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < m
        z = (tl.load(g + b * m + cols, mask=mask, other=0) - tl.load(c_row + cols, mask=mask, other=0)) * inv_reg
        z = tl.where(mask, z, float("-inf"))
        new_best = tl.maximum(best, tl.max(z, axis=0))
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(z - new_best), axis=0)
        best = new_best
    tl.store(out + b * n + row, best + tl.log(total))


@triton.jit
def _lse_cols_kernel(cost, f, out, n, m, inv_reg, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < m
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n):
        z = (tl.load(f + b * n + i) - tl.load(cost + (b * n + i) * m + cols, mask=mask, other=0)) * inv_reg
        new_best = tl.maximum(best, z)
        total = total * tl.exp(best - new_best) + tl.exp(z - new_best)
        best = new_best
    tl.store(out + b * m + cols, best + tl.log(total), mask=mask)


@triton.jit
def _plan_kernel(cost, f, g, out, n, m, inv_reg, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < m
    at = (b * n + row) * m + cols
    z = (tl.load(f + b * n + row) + tl.load(g + b * m + cols, mask=mask) - tl.load(cost + at, mask=mask)) * inv_reg
    tl.store(out + at, z if LOG else tl.exp(z), mask=mask)


def sinkhorn(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan):
    batch, n, m = cost.shape
    inv_reg = 1.0 / reg

    def lse_rows(c, g):
        out = torch.empty(batch, n, dtype=c.dtype, device=c.device)
        _lse_rows_kernel[(n, batch)](c, g.contiguous(), out, n, m, inv_reg, BLOCK=BLOCK)
        return out

    def lse_cols(c, f):
        out = torch.empty(batch, m, dtype=c.dtype, device=c.device)
        _lse_cols_kernel[(triton.cdiv(m, BLOCK), batch)](c, f.contiguous(), out, n, m, inv_reg, BLOCK=BLOCK)
        return out

    f, g, iterations, error = iterate(cost, log_a, log_b, reg, max_iter, tol, check_every, lse_rows, lse_cols)
    plan = torch.empty_like(cost)
    if plan.numel():
        _plan_kernel[(triton.cdiv(m, BLOCK), n, batch)](cost, f, g, plan, n, m, inv_reg, LOG=log_plan, BLOCK=BLOCK)
    return plan, f, g, iterations, error
