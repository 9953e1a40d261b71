"""Reference ``gram``: the dot products of N same-shape tensors, or of their differences from a base,
over rows (the whole tensor as one row, or ``rows`` equal slices of its flat elements):

    G[r, i, j] = Σ_c (xᵢ[r, c] − base[r, c]) · (xⱼ[r, c] − base[r, c])      (no base: base = 0)

accumulated in float64 whatever the inputs' dtype: the methods that read it (nuslerp, multislerp,
Karcher means, Model Stock) turn norms and angles into coefficients, where float32 sums of
millions of squares lose the digits the angles need.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 20  # elements per step: bounds the float64 temporaries to N + 1 chunks


def gram(xs: list[torch.Tensor], base: torch.Tensor | None, rows: int) -> torch.Tensor:
    n = len(xs)
    out = torch.zeros(rows, n, n, dtype=torch.float64, device=xs[0].device)
    if rows == 0:
        return out
    flat = [x.reshape(rows, -1) for x in xs]
    b = None if base is None else base.reshape(rows, -1)
    cols = flat[0].shape[1]
    step = max(1, CHUNK // max(rows, 1))
    for c in range(0, cols, step):
        d = torch.stack([x[:, c : c + step].double() for x in flat])  # [n, rows, chunk]
        if b is not None:
            d -= b[:, c : c + step].double()
        out += torch.einsum("irc,jrc->rij", d, d)
    # G[j, i] is G[i, j] exactly: BLAS may round the two halves of a product differently (it does on AMD)
    return out.triu() + out.triu(1).transpose(1, 2)
