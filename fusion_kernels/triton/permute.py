"""Triton ``permute_many``: one gather launch per tensor. Runs of unpermuted dims are merged first,
so an element's source offset is a sum over at most (permuted dims + their gaps) terms."""

from __future__ import annotations

import triton
import triton.language as tl

from .._layout import merged_dims
from ._launch import BLOCK, grid, offsets


@triton.jit
def _gather_kernel(out, x, sizes, strides, perms, numel, D: tl.constexpr, PERMUTED: tl.constexpr, BLOCK: tl.constexpr):
    """out[o] = x[Σ_d src_d(i_d)·stride_d] with (i_0, …) the index of o; src_d = perms[d] where bit d of PERMUTED."""
    offs, mask = offsets(numel, BLOCK)
    rest = offs
    source = tl.zeros((BLOCK,), dtype=tl.int64)
    for k in tl.static_range(D):
        d = D - 1 - k
        i = rest % sizes[d]
        rest = rest // sizes[d]
        if (PERMUTED >> d) & 1:
            i = tl.load(perms[d] + i, mask=mask, other=0)
        source += i * strides[d]
    tl.store(out + offs, tl.load(x + source, mask=mask), mask=mask)


def permute_many(outs, xs, perms, slots) -> None:
    at = 0
    for out, x in zip(outs, xs, strict=True):
        dims, at = slots[at : at + x.dim()], at + x.dim()
        if x.numel() == 0:
            continue
        sizes, strides, tables = merged_dims(list(x.shape), dims, perms)
        permuted = sum(1 << d for d, t in enumerate(tables) if t is not None)
        _gather_kernel[grid(x.numel())](
            out,
            x,
            tuple(sizes),
            tuple(strides),
            tuple(t if t is not None else x for t in tables),
            x.numel(),
            D=len(sizes),
            PERMUTED=permuted,
            BLOCK=BLOCK,
        )
