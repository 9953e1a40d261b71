"""Layout helpers shared by the GPU backends' gathers."""

from __future__ import annotations

import torch


def merged_dims(
    shape: list[int], slots: list[int], perms: list[torch.Tensor]
) -> tuple[list[int], list[int], list[torch.Tensor | None]]:
    """(sizes, contiguous strides, permutation or None) per dim after merging neighbouring unpermuted
    dims: ``slots[d]`` indexes ``perms`` for a permuted dim, -1 otherwise."""
    sizes, tables = [], []
    for size, slot in zip(shape, slots, strict=True):
        if slot < 0 and tables and tables[-1] is None:
            sizes[-1] *= size
        else:
            sizes.append(size)
            tables.append(None if slot < 0 else perms[slot])
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    return sizes, strides, tables
