"""``truncated_svd`` and ``polar``: low-rank decompositions of a batch of same-shape matrices, the
work of the subspace merges (TSV-M, Iso-C, Iso-CTS).

The ``cpu`` backend runs LAPACK on one matrix per thread (SciPy's routines, called from the C++
extension, ``csrc/cpu/low_rank.cpp``, each thread holding SciPy's OpenBLAS to one thread of its own).
It takes them from the eigendecomposition of each matrix's q×q Gram matrix (q = min(m, n)) where
that is both faster and as accurate as an SVD, and by SVD where it is not. ``benchmarks/low_rank.py``
on a 2-core VM, batches of eight 768² float32 matrices: the top 96 triplets in 21 ms a matrix
against ``torch.linalg.svd``'s 102 ms, the polar factor (by SVD) in 65 ms against 109 ms.

- ``truncated_svd``: the Gram's top k eigenpairs. Its rounding is ε·λ₁ (λ = σ²), so the k-th
  vector is as accurate as the SVD's while λₖ ≥ 10⁻²·λ₁ (float32; 10⁻⁸·λ₁ in float64). A matrix
  below that is redone from a float64 Gram, and one below that too (nearly rank k) by SVD.
- ``polar``: Q = x·W·Λ^(-1/2)·Wᵀ for matrices of aspect 5:4 or more (cheaper than their SVD
  there). The Gram squares the condition number κ: a float32 Gram serves where λ_min ≥ 10⁻¹·λ_max
  (κ ≤ 3.2; its Q then as close to float64's as a float32 SVD's: 1.5·10⁻⁷ against 3.1·10⁻⁷ at
  κ = 2.8), a float64 one where λ_min ≥ 10⁻⁸·λ_max. A Cholesky of Gram − ratio·(its largest
  diagonal entry)·I turns most matrices below a ratio down before their eigh is spent. Without S
  (``values=False``), square matrices of n ≥ 384 and κ ≤ 10⁻²/ε take the scaled Newton iteration
  X ← (μX + (μX)⁻ᵀ)/2 with Byers and Xu's scaling (2008): five or six inverses (torch's LAPACK, a
  matrix at a time), cheaper than an SVD from about 384² on (7% there, 25% at 768²); its Q is
  within 10× of the float32 SVD's error on a sum of Gaussian matrices (κ ≈ 2·10³), closer than it
  from κ ≈ 10⁴ on. The rest go by SVD.
"""

from __future__ import annotations

import ctypes
import math
from types import ModuleType

import torch

from .. import _native, _validate
from .. import reference as ref
from .._dispatch import select
from ..errors import ArgumentTypeError, DeviceError, DTypeError, ShapeError, WeightError
from ..reference.low_rank import compute_dtype

# λₖ / λ₁ (eigenvalues of the Gram, σ²) from which the Gram's eigenvectors are taken, per dtype
_TRUNCATED_RATIO = {torch.float32: 1e-2, torch.float64: 1e-8}
# λ_min / λ_max from which the polar factor is taken from the Gram, per dtype (float32: κ ≤ 3.2)
_POLAR_RATIO = {torch.float32: 1e-1, torch.float64: 1e-8}
_POLAR_ASPECT = 1.25  # max(m, n) / min(m, n) from which polar uses a Gram
_NEWTON_MIN = 384  # square matrices from this size take Newton's iteration (smaller SVDs are cheaper)
_NEWTON_STEPS = 12  # inverses after which a matrix Newton's iteration has not converged goes by SVD
_ROUTINES = (
    ("cython_blas", "ssyrk"),
    ("cython_blas", "dsyrk"),
    ("cython_lapack", "ssyevr"),
    ("cython_lapack", "dsyevr"),
    ("cython_lapack", "ssyevd"),
    ("cython_lapack", "dsyevd"),
    ("cython_lapack", "sgesdd"),
    ("cython_lapack", "dgesdd"),
    ("cython_lapack", "spotrf"),
    ("cython_lapack", "dpotrf"),
)


def _address(module: ModuleType, name: str) -> int:
    """The C function behind one of SciPy's exported Cython BLAS/LAPACK routines."""
    capsule = module.__pyx_capi__[name]
    get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


def _blas_thread_setter(module: ModuleType) -> int:
    """The address of ``openblas_set_num_threads_local`` (sets the thread count, returns the
    previous one) in the OpenBLAS behind SciPy's LAPACK, found through the library's dependencies,
    or 0 when it has none (another BLAS)."""
    try:
        return ctypes.cast(ctypes.CDLL(module.__file__).openblas_set_num_threads_local, ctypes.c_void_p).value or 0
    except (AttributeError, OSError):
        return 0


def _lapack() -> ModuleType:
    """The extension, SciPy's LAPACK routines handed over to it (once)."""
    lib = _native.lib()
    if not lib.lapack_ready():
        import scipy.linalg.cython_blas
        import scipy.linalg.cython_lapack

        routines = [_address(getattr(scipy.linalg, module), name) for module, name in _ROUTINES]
        lib.set_lapack(routines, _blas_thread_setter(scipy.linalg.cython_lapack))
    return lib


def _stored(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A batch [B, p, q] as contiguous memory: a itself, or the contiguous [B, q, p] it is the
    transposed view of (``_tall`` of a wide matrix), and which."""
    if not a.is_contiguous() and a.mT.is_contiguous():
        return a.mT, True
    return a.contiguous(), False


def _gram_eigh(a: torch.Tensor, k: int, min_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k eigenpairs of the Gram aᵀa of every [p, q] matrix of the batch a (float32 or
    float64): eigenvalues ascending [B, k], eigenvectors as the columns of [B, q, k]; NaN for a
    matrix LAPACK failed on, whose Gram is out of range, or (``min_ratio``) whose Gram a Cholesky
    shows to have λ_min < min_ratio·λ_max (no eigh spent on it)."""
    memory, transposed = _stored(a)
    batch, p, q = a.shape
    lam, vecs = a.new_empty(batch, k), a.new_empty(batch, k, q)
    f64, threads = a.dtype == torch.float64, min(_native.threads(), batch)  # a matrix per thread
    _lapack().gram_eigh(
        memory.data_ptr(), transposed, f64, batch, p, q, k, min_ratio, lam.data_ptr(), vecs.data_ptr(), threads
    )
    return lam, vecs.mT


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's thin SVD of every matrix of the batch a [B, m, n] (in its compute dtype),
    by LAPACK's gesdd a matrix per thread."""
    work, transposed = _stored(a.to(compute_dtype(a.dtype)))
    batch, m, n = work.shape
    r = min(m, n)
    u, s, vh = work.new_empty(batch, m, r), work.new_empty(batch, r), work.new_empty(batch, r, n)
    f64, threads = work.dtype == torch.float64, min(_native.threads(), batch)  # a matrix per thread
    failed = _lapack().thin_svd(work.data_ptr(), f64, batch, m, n, u.data_ptr(), s.data_ptr(), vh.data_ptr(), threads)
    if failed:
        raise WeightError(f"LAPACK's SVD (gesdd) did not converge on {failed} of {batch} matrices [{m}, {n}]")
    return (vh.mT, s, u.mT) if transposed else (u, s, vh)  # aᵀ = U·S·Vh: a = Vhᵀ·S·Uᵀ


def _svd_truncated(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = _svd(a)
    return u[..., :k], s[..., :k], vh[..., :k, :].mT


def _svd_polar(a: torch.Tensor, right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = _svd(a)
    return (u @ vh if right is None else u @ (vh @ right.to(vh.dtype))), s


def _tall(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as a batch [B, p, q] with p >= q (transposed when wide), and whether it was transposed."""
    m, n = x.shape[-2:]
    flat = x.reshape(-1, m, n)
    return (flat.mT, True) if m < n else (flat, False)


def _by_routes(a: torch.Tensor, dtype: torch.dtype, by_gram, by_svd, *extra: torch.Tensor) -> tuple:
    """The outputs of every matrix of the batch a by the first route that serves it:
    ``by_gram(a, float32)`` (skipped for float64 inputs), ``by_gram(a, float64)``, then ``by_svd(a)``;
    ``by_gram`` returns its outputs and which matrices they are accurate for. ``extra`` batches go
    to both beside a, cut to the same matrices."""
    first = torch.float64 if dtype == torch.float64 else torch.float32
    *outs, ok = by_gram(a, first, *extra)
    todo = (~ok).nonzero().flatten()
    if todo.numel() and first != torch.float64:
        *redone, ok = by_gram(a[todo], torch.float64, *(e[todo] for e in extra))
        for out, value in zip(outs, redone, strict=True):
            out[todo] = value.to(out.dtype)
        todo = todo[~ok]
    if todo.numel():
        for out, value in zip(outs, by_svd(a[todo], *(e[todo] for e in extra)), strict=True):
            out[todo] = value.to(out.dtype)
    return tuple(outs)


def _gram_triplets(a: torch.Tensor, k: int, dtype: torch.dtype) -> tuple:
    """The top k triplets (U, S, V) of every [p, q] matrix of the batch a (p >= q) from its Gram's
    eigenvectors in ``dtype``, in a's dtype, and which matrices they are accurate for."""
    work = a.to(dtype)
    lam, w = _gram_eigh(work, k)  # ascending; NaN where not decomposed
    ok = (lam[:, 0] >= _TRUNCATED_RATIO[dtype] * lam[:, -1]) & (lam[:, -1] > 0)
    v = w.flip(-1)
    y = work @ v  # x·vᵢ = σᵢ·uᵢ
    s = torch.linalg.vector_norm(y, dim=-2)
    u = y.div_(s.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-2))
    return u.to(a.dtype), s.to(a.dtype), v.to(a.dtype), ok


def _truncated_by_gram(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.numel() == 0 or k == 0:
        return ref.truncated_svd(x, k)
    a, wide = _tall(x)
    u, s, v = _by_routes(a, x.dtype, lambda b, dtype: _gram_triplets(b, k, dtype), lambda rest: _svd_truncated(rest, k))
    if wide:  # x = (xᵀ)ᵀ = (U·S·Vᵀ)ᵀ = V·S·Uᵀ
        u, v = v, u
    lead = x.shape[:-2]
    u, vh = u.contiguous(), v.mT.contiguous()
    return u.reshape(*lead, *u.shape[-2:]), s.reshape(*lead, k), vh.reshape(*lead, k, x.shape[-1])


def _gram_polar(a: torch.Tensor, dtype: torch.dtype, right: torch.Tensor | None = None) -> tuple:
    """Q = a·W·Λ^(-1/2)·Wᵀ (Q·right: a·(W·Λ^(-1/2)·Wᵀ·right), the small product first) and
    S = √Λ (descending) of every [p, q] matrix of the batch a (p >= q) from its Gram's
    eigendecomposition in ``dtype``, in a's dtype, and which matrices they are accurate for
    (λ_min ≥ _POLAR_RATIO·λ_max)."""
    work = a.to(dtype)
    lam, w = _gram_eigh(work, a.shape[-1], _POLAR_RATIO[dtype])  # ascending; NaN where turned down
    ok = (lam[:, 0] >= _POLAR_RATIO[dtype] * lam[:, -1]) & (lam[:, -1] > 0)
    s = lam.flip(-1).clamp_min(0).sqrt().to(a.dtype)

    def factor(work, lam, w, right):
        inverse_root = (w * lam.rsqrt().unsqueeze(-2)) @ w.mT
        m = inverse_root if right is None else inverse_root @ right.to(dtype)
        if work.mT.is_contiguous() and not work.is_contiguous():  # a wide x's transpose: Q = (mᵀ·x)ᵀ, x's layout
            return (m.mT @ work.mT).mT.to(a.dtype)
        return (work @ m).to(a.dtype)

    columns = a.shape[-1] if right is None else right.shape[-1]
    if bool(ok.all()):
        return factor(work, lam, w, right), s, ok
    q = a.new_zeros(*a.shape[:-1], columns)  # the products only for the matrices the Gram serves
    if bool(ok.any()):
        q[ok] = factor(work[ok], lam[ok], w[ok], None if right is None else right[ok])
    return q, s, ok


def _spectral_norm(x: torch.Tensor, generator: torch.Generator, steps: int = 8) -> float:
    """‖x‖₂ estimated from below by power iteration on xᵀx (NaN for an x that maps v to 0)."""
    v = torch.randn(x.shape[-1], dtype=x.dtype, generator=generator)
    for _ in range(steps):
        v = x.mT @ (x @ v)
        v /= torch.linalg.vector_norm(v)
    return float(torch.linalg.vector_norm(x @ v))


def _newton_polar_one(x: torch.Tensor) -> torch.Tensor | None:
    """The polar factor of one square float32/float64 matrix by the scaled Newton iteration
    Xₖ₊₁ = (μₖXₖ + (μₖXₖ)⁻ᵀ)/2, X₀ = x, with Byers and Xu's scalings μ₀ = 1/√(αβ),
    μ₁ = √(2√(αβ)/(α+β)), μₖ₊₁ = 1/√((μₖ + 1/μₖ)/2) for α ≈ σ_max, β ≈ σ_min (power iterations
    on x and x⁻¹); None where the estimate α/β exceeds 10⁻²/ε, a step is singular or not finite, or
    :data:`_NEWTON_STEPS` inverses do not converge. Stops once ‖Xₖ₊₁ − Xₖ‖_F ≤ 4·√(ε·n): the
    iteration converges quadratically, so Xₖ₊₁ is then within about 8ε of Q."""
    eps = torch.finfo(x.dtype).eps
    inverse, info = torch.linalg.inv_ex(x)  # one matrix at a time: torch's batched inverse is not used
    if info:
        return None
    generator = torch.Generator().manual_seed(0)
    alpha, beta = _spectral_norm(x, generator), 1 / _spectral_norm(inverse, generator)
    if not (alpha > 0 and beta > 0 and alpha <= 1e-2 / eps * beta):  # NaN too
        return None
    mu, next_mu = 1 / math.sqrt(alpha * beta), math.sqrt(2 * math.sqrt(alpha * beta) / (alpha + beta))
    stop = 4 * math.sqrt(eps * x.shape[-1])
    for _ in range(_NEWTON_STEPS):
        new = torch.add(x, inverse.mT, alpha=1 / mu**2).mul_(mu / 2)
        delta = float(torch.linalg.matrix_norm(new - x))
        x = new
        if not math.isfinite(delta):
            return None
        if delta <= stop:
            return x
        mu, next_mu = next_mu, 1 / math.sqrt((next_mu + 1 / next_mu) / 2)
        inverse, info = torch.linalg.inv_ex(x)
        if info:
            return None
    return None


def _newton_polar(a: torch.Tensor, right: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """Q (Q·right) of every square matrix of the batch a, in its compute dtype: by
    :func:`_newton_polar_one`, by SVD for the matrices it turns down; no S."""
    work = a.to(compute_dtype(a.dtype))
    q, rest = torch.empty_like(work), []
    for i, x in enumerate(work):
        got = _newton_polar_one(x)
        if got is None:
            rest.append(i)
        else:
            q[i] = got
    if rest:
        q[rest] = _svd_polar(work[rest])[0]
    return (q if right is None else q @ right.to(q.dtype)), None


def _polar_by_gram(
    x: torch.Tensor, right: torch.Tensor | None = None, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    m, n = x.shape[-2:]
    if x.numel() == 0 or (right is not None and right.numel() == 0):
        return ref.polar(x, right, values)
    a, wide = _tall(x)
    flat_right = None if right is None else right.reshape(-1, *right.shape[-2:])
    # a tall x takes right into its product; a wide one's Q is the transpose of its transpose's
    extra = () if right is None or wide else (flat_right,)
    if m == n and n >= _NEWTON_MIN and not values:  # S would cost an SVD's worth: the SVD gives both
        q, s = _newton_polar(a, *extra)
    elif max(m, n) < _POLAR_ASPECT * min(m, n):
        q, s = _svd_polar(a, *extra)
    else:
        q, s = _by_routes(a, x.dtype, _gram_polar, _svd_polar, *extra)
    q = q.mT if wide else q
    if right is not None and wide:
        q = q @ flat_right.to(q.dtype)
    q = q.to(x.dtype).contiguous()  # a wide x's Q: its transpose's, stored as such
    q = q.reshape(*x.shape[:-1], q.shape[-1])
    return q, (s.to(x.dtype).reshape(*x.shape[:-2], s.shape[-1]) if values else None)


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


def _packed(x: torch.Tensor) -> torch.Tensor:
    """x itself where its matrices are contiguous or contiguous transposed (the backends take
    either: LAPACK is handed a transposed matrix as its transpose), else a contiguous copy."""
    return x if x.is_contiguous() or x.mT.is_contiguous() else x.contiguous()


def _recording(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def truncated_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest singular triplets of every matrix of x: ``(U [..., m, k], S [..., k],
    Vh [..., k, n])`` with x ≈ U·diag(S)·Vh, S descending, orthonormal columns of U and rows of Vh,
    in x's dtype (computed in float32, float64 for float64 x), contiguous. Conventions and formula in
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
    return select(op, TRUNCATED_IMPLS, x.device, x.dtype, (x, k))(_packed(x), k)


def polar(
    x: torch.Tensor, right: torch.Tensor | None = None, *, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The orthogonal polar factor of every matrix of x and its singular values: ``(Q [..., m, n],
    S [..., min(m, n)])``, x = Q·H with Q = W·Vh from the thin SVD x = W·diag(S)·Vh, S descending,
    in x's dtype, contiguous. For a rank-deficient x, Q is not unique (the SVD's choice is returned). When
    autograd records x, the reference (an SVD) runs.

    Args:
        x: a float tensor ``[..., m, n]`` with finite entries; any leading batch dimensions.
        right: optional ``[..., n, p]`` (x's batch dimensions and dtype): return Q·right
            ``[..., m, p]`` in place of Q. For a tall x whose factor comes from its Gram,
            Q = x·G^(-1/2) and Q·right = x·(G^(-1/2)·right): one m×n×p product where Q and then
            Q·right take two.
        values: False returns ``(Q, None)``, and lets square matrices of 384² or more take
            Newton's iteration (see the module docstring). Σ S is then (Q * x).sum((-2, -1)), as
            x = Q·H and trace(Qᵀx) = trace(H).

    Example:
        >>> q, s = fk.polar(x)       # Iso-C: s.mean(-1) * q has every singular value equal
        >>> merged, _ = fk.polar(u_side, right=s[..., None] * v_factor)  # TSV-M: U⊥·diag(S)·V⊥
    """
    x = _check_matrices("polar", x)
    if right is not None:
        right = _validate.check_tensor("polar", "right", right)
        if right.dtype != x.dtype:
            raise DTypeError(f"polar: argument 'right' expected dtype {x.dtype} (x's), got {right.dtype}")
        if right.device != x.device:
            raise DeviceError(f"polar: argument 'right' expected device {x.device} (x's), got {right.device}")
        if right.dim() != x.dim() or right.shape[:-2] != x.shape[:-2] or right.shape[-2] != x.shape[-1]:
            want = f"[{', '.join(map(str, (*x.shape[:-2], x.shape[-1])))}, p]"
            raise ShapeError(
                f"polar: argument 'right' expected shape {want} (x's batch, x's columns), got {tuple(right.shape)}"
            )
    if not isinstance(values, bool):
        raise ArgumentTypeError(f"polar: argument 'values' expected a bool, got {type(values).__name__}")
    if _recording(x) or (right is not None and _recording(right)):
        return ref.polar(x, right, values)
    args = (_packed(x), right, values)
    return select("polar", POLAR_IMPLS, x.device, x.dtype, args)(*args)
