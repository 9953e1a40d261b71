"""Triton ``permute_many``: every tensor of one element width in one launch. A table in device
memory holds each tensor's addresses, merged sizes and strides and permutation addresses (runs of
unpermuted dims are merged first); each program reads which tensor its block belongs to, then
gathers: an output index is decomposed over the dims and each permuted dim's index goes through
its permutation. Elements move as 1, 2, 4 or 8-byte integers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import merged_dims
from ._launch import BLOCK

MAX_DIMS = 8
FIELDS = 4 + 3 * MAX_DIMS  # out, in, numel, first block; then sizes, strides, permutation addresses


@triton.jit
def _word_pointer(address, WIDTH: tl.constexpr):
    if WIDTH == 1:
        return address.to(tl.pointer_type(tl.int8))
    elif WIDTH == 2:
        return address.to(tl.pointer_type(tl.int16))
    elif WIDTH == 4:
        return address.to(tl.pointer_type(tl.int32))
    else:
        return address.to(tl.pointer_type(tl.int64))


@triton.jit
def _gather_kernel(table, block_owner, WIDTH: tl.constexpr, MAX_DIMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(block_owner + pid).to(tl.int64) * (4 + 3 * MAX_DIMS)
    out = _word_pointer(tl.load(row), WIDTH)
    x = _word_pointer(tl.load(row + 1), WIDTH)
    numel = tl.load(row + 2)
    offs = (pid - tl.load(row + 3)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    rest = offs
    source = tl.zeros((BLOCK,), dtype=tl.int64)
    for k in tl.static_range(MAX_DIMS):  # dims are right-aligned; padding dims have size 1
        d = MAX_DIMS - 1 - k
        size = tl.load(row + 4 + d)
        i = rest % size
        rest = rest // size
        perm = tl.load(row + 4 + 2 * MAX_DIMS + d)
        if perm != 0:
            i = tl.load(perm.to(tl.pointer_type(tl.int64)) + i, mask=mask, other=0)
        source += i * tl.load(row + 4 + MAX_DIMS + d)
    tl.store(out + offs, tl.load(x + source, mask=mask), mask=mask)


def permute_many(outs, xs, perms, slots) -> None:
    groups: dict[int, list[list[int]]] = {}
    at = 0
    for out, x in zip(outs, xs, strict=True):
        dims, at = slots[at : at + x.dim()], at + x.dim()
        if x.numel() == 0:
            continue
        sizes, strides, tables = merged_dims(list(x.shape), dims, perms)
        pad = MAX_DIMS - len(sizes)
        record = [out.data_ptr(), x.data_ptr(), x.numel(), 0]
        record += (
            [1] * pad + sizes + [0] * pad + strides + [0] * pad + [0 if t is None else t.data_ptr() for t in tables]
        )
        groups.setdefault(x.element_size(), []).append(record)
    device = xs[0].device
    for width, records in groups.items():
        blocks = [triton.cdiv(r[2], BLOCK) for r in records]
        first = 0
        for r, b in zip(records, blocks, strict=True):
            r[3], first = first, first + b
        table = torch.tensor(records, dtype=torch.int64).to(device)
        owner = torch.repeat_interleave(torch.arange(len(records), dtype=torch.int32), torch.tensor(blocks)).to(device)
        _gather_kernel[(first,)](table, owner, WIDTH=width, MAX_DIMS=MAX_DIMS, BLOCK=BLOCK)


def declines(xs) -> str | None:
    if any(x.is_complex() for x in xs):
        return "Triton has no complex dtypes"
    if any(x.dim() > MAX_DIMS for x in xs):
        return f"takes tensors of at most {MAX_DIMS} dims"
    return None
