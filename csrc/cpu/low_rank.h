// Batched symmetric eigensolvers and SVDs for the low-rank ops (fusion_kernels/ops/low_rank.py):
// LAPACK on one matrix per thread. The routines are SciPy's (its cython_lapack / cython_blas
// entry points, LP64), handed over once by address, so the extension links no LAPACK of its own.
#pragma once
#include <cstdint>

namespace fk {

// Addresses of SciPy's cython_blas / cython_lapack functions (ssyrk, dsyrk, ssyevr, dsyevr,
// ssyevd, dsyevd, sgesdd, dgesdd, spotrf, dpotrf), in that order, and of its OpenBLAS's
// openblas_set_num_threads_local (null if it has none: a batch then runs on the calling thread,
// LAPACK threading itself); set once before the calls below.
void set_lapack(const void* const fns[10], const void* set_threads_local);
bool lapack_ready();

// For each [p, q] matrix A of the batch (float64 when `f64`, else float32; row-major, or its
// transpose row-major [q, p] when `transposed`): the top k eigenpairs of its Gram AᵀA, eigenvalues
// ascending in lam [batch, k], eigenvector j as row j of vecs [batch, k, q]. Returns the number of
// matrices not decomposed (their rows are NaN): LAPACK failed, or the Gram's largest diagonal entry
// lies outside [2^-80, 2^100] (float32; [2^-900, 2^900] float64), where its entries overflow or
// lose precision to underflow, or (min_ratio > 0) a Cholesky shows λ_min < min_ratio·λ_max.
int64_t gram_eigh(const void* a, bool transposed, bool f64, int64_t batch, int64_t p, int64_t q, int64_t k,
                  double min_ratio, void* lam, void* vecs, int threads);

// Thin SVD A = U·diag(s)·Vh of each row-major [m, n] matrix (r = min(m, n)): u [batch, m, r],
// s [batch, r] descending, vh [batch, r, n]. Returns the number of failures (NaN rows).
int64_t thin_svd(const void* a, bool f64, int64_t batch, int64_t m, int64_t n, void* u, void* s, void* vh,
                 int threads);

}  // namespace fk
