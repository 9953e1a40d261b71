"""``truncated_svd`` and ``polar``: low-rank decompositions of a batch of same-shape matrices, the
work of the subspace merges (TSV-M, Iso-C, Iso-CTS).

The ``cpu`` backend takes them from the eigendecomposition of each matrix's q×q Gram matrix
(q = min(m, n)) where that is both faster and as accurate as an SVD, and by the reference's SVD
where it is not (measured on a 2-core VM, ``benchmarks/low_rank.py``):

- ``truncated_svd``: a float32 Gram eigh costs 40-60% of a float32 SVD of a square matrix and
  15-25% of a 4:1 one. The Gram's rounding is ε·λ₁ (λ = σ²), so the k-th vector is as accurate
  as the SVD's while λₖ ≥ 10⁻²·λ₁ (float32; 10⁻⁸·λ₁ in float64). A matrix below that is redone
  from a float64 Gram, and one below that too (nearly rank k) by SVD.
- ``polar``: the Gram squares the condition number, so it is formed and decomposed in float64,
  Q = x·W·Λ^(-1/2)·Wᵀ; that costs 1.1-1.4× a float32 SVD for a square matrix, 0.7-0.9× for one
  4:3 and 0.4-0.7× from 2:1 on. Matrices under 5:4, and those with λ_min < 10⁻⁸·λ_max, go by SVD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _validate
from .. import reference as ref
from .._dispatch import select
from ..errors import ShapeError, WeightError

# λₖ / λ₁ (eigenvalues of the Gram, σ²) from which the Gram's eigenvectors are taken, per dtype
_TRUNCATED_RATIO = {torch.float32: 1e-2, torch.float64: 1e-8}
_POLAR_RATIO = 1e-8  # λ_min / λ_max, float64
_POLAR_ASPECT = 1.25  # max(m, n) / min(m, n) from which polar uses the float64 Gram


def _tall(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as a batch [B, p, q] with p >= q (transposed when wide), and whether it was transposed."""
    m, n = x.shape[-2:]
    flat = x.reshape(-1, m, n)
    return (flat.mT, True) if m < n else (flat, False)


def _by_svd_where(todo: torch.Tensor, a: torch.Tensor, outs: tuple, fn: Callable) -> None:
    """Writes ``fn(a[todo])`` (the reference) into ``outs`` at the batch rows ``todo``."""
    if todo.numel():
        for out, value in zip(outs, fn(a[todo]), strict=True):
            out[todo] = value.to(out.dtype)


def _scaled(a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every matrix of the batch a divided by the power of two 2ᵉ that brings its largest |entry|
    into [1, 2), in ``dtype`` (exact but for the cast), and the float64 2ᵉ: the Gram of a matrix
    of huge or tiny entries would overflow or underflow, while eigenvectors and the polar factor do
    not depend on the scale (singular values scale with it)."""
    _, exponent = torch.frexp(a.abs().amax(dim=(-2, -1)).double())
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 1)
    return (a.double() / scale[:, None, None]).to(dtype), scale  # a.double() may be the input itself


def _gram_triplets(a: torch.Tensor, k: int, dtype: torch.dtype) -> tuple:
    """The top k triplets (U, S, V) of every [p, q] matrix of the batch a (p >= q) from its Gram's
    eigenvectors in ``dtype``, in a's dtype, and which matrices they are accurate for."""
    work, scale = _scaled(a, dtype)
    lam, w = torch.linalg.eigh(work.mT @ work)  # ascending
    ok = (lam[:, -k] >= _TRUNCATED_RATIO[dtype] * lam[:, -1]) & (lam[:, -1] > 0)
    v = w[:, :, -k:].flip(-1)
    y = work @ v  # x·vᵢ = σᵢ·uᵢ
    s = torch.linalg.vector_norm(y, dim=-2)
    u = y / s.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-2)
    return u.to(a.dtype), (s.double() * scale[:, None]).to(a.dtype), v.to(a.dtype), ok


def _truncated_by_gram(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.numel() == 0 or k == 0:
        return ref.truncated_svd(x, k)
    a, wide = _tall(x)
    first = torch.float64 if x.dtype == torch.float64 else torch.float32
    u, s, v, ok = _gram_triplets(a, k, first)
    todo = (~ok).nonzero().flatten()
    if todo.numel() and first != torch.float64:
        u[todo], s[todo], v[todo], ok = _gram_triplets(a[todo], k, torch.float64)
        todo = todo[~ok]
    _by_svd_where(todo, a, (u, s, v), lambda rest: _uv(*ref.truncated_svd(rest, k)))
    if wide:  # x = (xᵀ)ᵀ = (U·S·Vᵀ)ᵀ = V·S·Uᵀ
        u, v = v, u
    lead = x.shape[:-2]
    return u.reshape(*lead, *u.shape[-2:]), s.reshape(*lead, k), v.mT.reshape(*lead, k, x.shape[-1])


def _uv(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple:
    return u, s, vh.mT


def _polar_by_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[-2:]
    if x.numel() == 0 or max(m, n) < _POLAR_ASPECT * min(m, n):
        return ref.polar(x)
    a, wide = _tall(x)
    work, scale = _scaled(a, torch.float64)
    lam, w = torch.linalg.eigh(work.mT @ work)  # ascending
    ok = (lam[:, 0] >= _POLAR_RATIO * lam[:, -1]) & (lam[:, -1] > 0)
    inv_sqrt = lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    q = (work @ ((w * inv_sqrt.unsqueeze(-2)) @ w.mT)).to(x.dtype)
    s = (lam.flip(-1).clamp_min(0).sqrt() * scale[:, None]).to(x.dtype)
    _by_svd_where((~ok).nonzero().flatten(), a, (q, s), ref.polar)
    q = q.mT if wide else q
    return q.reshape(x.shape), s.reshape(*x.shape[:-2], s.shape[-1])


TRUNCATED_IMPLS = {"torch": ref.truncated_svd, "cpu": _truncated_by_gram}
POLAR_IMPLS = {"torch": ref.polar, "cpu": _polar_by_gram}


def _check_matrices(op: str, x: object) -> torch.Tensor:
    x = _validate.check_tensor(op, "x", x)
    _validate.check_float(op, "x", x)
    if x.dim() < 2:
        raise ShapeError(
            f"{op}: argument 'x' expected a matrix or a batch of them [..., m, n], got shape {tuple(x.shape)}"
        )
    if not _validate.all_finite(x):
        raise WeightError(f"{op}: argument 'x' has NaN or infinite entries")
    return x


def _recording(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def truncated_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest singular triplets of every matrix of x: ``(U [..., m, k], S [..., k],
    Vh [..., k, n])`` with x ≈ U·diag(S)·Vh, S descending, orthonormal columns of U and rows of Vh,
    in x's dtype (computed in float32, float64 for float64 x). Conventions and formula in
    :mod:`fusion_kernels.reference.low_rank`; how the ``cpu`` backend gets them, in this module's
    docstring. When autograd records x, the reference (an SVD) runs.

    Args:
        x: a float tensor ``[..., m, n]`` with finite entries; any leading batch dimensions.
        k: how many triplets, 0 <= k <= min(m, n).

    Example:
        >>> u, s, vh = fk.truncated_svd(task_matrices, 96)   # [T, L, m, n] -> the top 96 of each
    """
    op = "truncated_svd"
    x = _check_matrices(op, x)
    rank = min(x.shape[-2:])
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= rank:
        raise ShapeError(f"{op}: argument 'k' expected an int in [0, {rank}] (min(m, n) of x), got {k!r}")
    if _recording(x):
        return ref.truncated_svd(x, k)
    return select(op, TRUNCATED_IMPLS, x.device, x.dtype, (x, k))(x.contiguous(), k)


def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal polar factor of every matrix of x and its singular values: ``(Q [..., m, n],
    S [..., min(m, n)])``, x = Q·H with Q = W·Vh from the thin SVD x = W·diag(S)·Vh, S descending,
    in x's dtype. For a rank-deficient x, Q is not unique (the SVD's choice is returned). When
    autograd records x, the reference (an SVD) runs.

    Args:
        x: a float tensor ``[..., m, n]`` with finite entries; any leading batch dimensions.

    Example:
        >>> q, s = fk.polar(x)       # Iso-C: s.mean(-1) * q has every singular value equal
    """
    x = _check_matrices("polar", x)
    if _recording(x):
        return ref.polar(x)
    return select("polar", POLAR_IMPLS, x.device, x.dtype, (x,))(x.contiguous())
