// What the Sinkhorn kernels see of one cost matrix, and their signatures. Plain structs: they
// cross into the per-ISA translation units.
#pragma once
#include <cstdint>

namespace fk {

template <class T>
struct CostView {
  const T* cost;  // [n, m], row-major
  int64_t n, m;
  T inv_reg;
};

// out[i - r0] = logsumexp_j((g[j] - C[i, j]) * inv_reg) for rows r0 <= i < r1.
template <class T>
using LseRowsFn = void (*)(const CostView<T>&, const T* g, int64_t r0, int64_t r1, T* out);
// out[j - c0] = logsumexp_i((f[i] - C[i, j]) * inv_reg) for columns c0 <= j < c1 (c1 - c0 <= kLseColumns).
template <class T>
using LseColsFn = void (*)(const CostView<T>&, const T* f, int64_t c0, int64_t c1, T* out);
// Rows r0 <= i < r1 of the plan: exp((f[i] + g[j] - C[i, j]) * inv_reg), or its log.
template <class T>
using PlanRowsFn = void (*)(const CostView<T>&, const T* f, const T* g, int64_t r0, int64_t r1, T* out, bool log);

template <class T>
struct SinkhornKernels {
  LseRowsFn<T> lse_rows;
  LseColsFn<T> lse_cols;
  PlanRowsFn<T> plan_rows;
};

constexpr int64_t kLseColumns = 256;

}  // namespace fk
