"""Reference low-rank decompositions of a batch of matrices x[..., m, n], r = min(m, n):

- ``truncated_svd(x, k)``: the k largest singular triplets, x ≈ U·diag(S)·Vh with S descending,
  U [..., m, k] and Vhᵀ [..., n, k] with orthonormal columns;
- ``polar(x)``: the orthogonal polar factor Q = W·Vh of the thin SVD x = W·diag(S)·Vh (x = Q·H with
  H = Vhᵀ·diag(S)·Vh symmetric positive semi-definite), and S descending; ``polar(x, right)``:
  Q·right in place of Q (right [..., n, p]); ``values=False``: None in place of S.

One ``torch.linalg.svd`` in float32 (float64 for float64 x); results in x's dtype, contiguous. A singular
vector is defined up to its sign (a pair u, v flips together), and within a repeated singular value
only its subspace is: compare U·diag(S)·Vh, subspaces, or Q, not single columns.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncated_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(x.to(compute_dtype(x.dtype)), full_matrices=False)
    return tuple(t.to(x.dtype).contiguous() for t in (u[..., :k], s[..., :k], vh[..., :k, :]))


def polar(
    x: torch.Tensor, right: torch.Tensor | None = None, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    work = compute_dtype(x.dtype)
    u, s, vh = torch.linalg.svd(x.to(work), full_matrices=False)
    q = u @ vh
    return (q if right is None else q @ right.to(work)).to(x.dtype), (s.to(x.dtype) if values else None)
