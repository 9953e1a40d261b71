"""What the elementwise Triton kernels share: the block size, the grid, int64 offsets and the
final rounding store. Inputs travel as tuples of tensors (one pointer argument each), so a merge
of N models is one launch for any N."""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


def grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


@triton.jit
def offsets(numel, BLOCK: tl.constexpr):
    """This program's int64 element offsets and their in-bounds mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def store_rounded(ptr, offs, value, mask):
    """Store float32 ``value`` into ``ptr``'s dtype, rounding to nearest even as ``tensor.to`` does.

    bfloat16 is rounded by hand (add 0x7FFF + lsb, keep the high half; NaN -> 0x7FC0, as the C++
    kernels do) because the interpreter's own conversion truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = tl.where(value != value, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
