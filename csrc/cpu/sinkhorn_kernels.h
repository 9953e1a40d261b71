// Lane-templated bodies of the log-domain Sinkhorn half-steps (see sinkhorn.cpp for the loop).
// Each log-sum-exp takes two passes: the maximum, then the sum of exponentials below it, so no
// exponent overflows however small reg is. Vectors run over whole rows or over fixed column
// blocks, so which elements take the scalar tail never depends on the thread count.
#pragma once
#include <cmath>

#include "lanes.h"
#include "sinkhorn_args.h"

namespace fk {
namespace {

template <class V, class S, class T>
void lse_rows_range(const CostView<T>& c, const T* g, int64_t r0, int64_t r1, T* out) {
  const int64_t m = c.m;
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = c.cost + i * m;
    typename V::R vmax = V::set1(-INFINITY);
    T smax = -INFINITY;
    int64_t j = 0;
    for (; j + V::width <= m; j += V::width) vmax = V::max(vmax, V::sub(V::load(g + j), V::load(row + j)));
    for (; j < m; ++j) smax = S::max(smax, g[j] - row[j]);
    const T mx = S::max(V::hmax(vmax), smax);
    const typename V::R vmx = V::set1(mx), vinv = V::set1(c.inv_reg);
    typename V::R vsum = V::zero();
    T ssum = 0;
    for (j = 0; j + V::width <= m; j += V::width)
      vsum = V::add(vsum, V::exp(V::mul(V::sub(V::sub(V::load(g + j), V::load(row + j)), vmx), vinv)));
    for (; j < m; ++j) ssum += S::exp((g[j] - row[j] - mx) * c.inv_reg);
    out[i - r0] = mx * c.inv_reg + std::log(V::hsum(vsum) + ssum);
  }
}

template <class V, class S, class T>
void lse_cols_range(const CostView<T>& c, const T* f, int64_t c0, int64_t c1, T* out) {
  alignas(64) T mx[kLseColumns], sum[kLseColumns];
  const int64_t w = c1 - c0;
  for (int64_t j = 0; j < w; ++j) {
    mx[j] = -INFINITY;
    sum[j] = 0;
  }
  for (int64_t i = 0; i < c.n; ++i) {
    const T* row = c.cost + i * c.m + c0;
    const typename V::R fi = V::set1(f[i]);
    int64_t j = 0;
    for (; j + V::width <= w; j += V::width) V::store(mx + j, V::max(V::load(mx + j), V::sub(fi, V::load(row + j))));
    for (; j < w; ++j) mx[j] = S::max(mx[j], f[i] - row[j]);
  }
  const typename V::R vinv = V::set1(c.inv_reg);
  for (int64_t i = 0; i < c.n; ++i) {
    const T* row = c.cost + i * c.m + c0;
    const typename V::R fi = V::set1(f[i]);
    int64_t j = 0;
    for (; j + V::width <= w; j += V::width) {
      const typename V::R z = V::mul(V::sub(V::sub(fi, V::load(row + j)), V::load(mx + j)), vinv);
      V::store(sum + j, V::add(V::load(sum + j), V::exp(z)));
    }
    for (; j < w; ++j) sum[j] += S::exp((f[i] - row[j] - mx[j]) * c.inv_reg);
  }
  for (int64_t j = 0; j < w; ++j) out[j] = mx[j] * c.inv_reg + std::log(sum[j]);
}

template <class V, class S, class T>
void plan_rows_range(const CostView<T>& c, const T* f, const T* g, int64_t r0, int64_t r1, T* out, bool log) {
  const int64_t m = c.m;
  const typename V::R vinv = V::set1(c.inv_reg);
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = c.cost + i * m;
    T* dst = out + i * m;
    const typename V::R fi = V::set1(f[i]);
    int64_t j = 0;
    for (; j + V::width <= m; j += V::width) {
      const typename V::R z = V::mul(V::sub(V::add(fi, V::load(g + j)), V::load(row + j)), vinv);
      V::store(dst + j, log ? z : V::exp(z));
    }
    for (; j < m; ++j) {
      const T z = (f[i] + g[j] - row[j]) * c.inv_reg;
      dst[j] = log ? z : S::exp(z);
    }
  }
}

template <class V, class S, class T>
SinkhornKernels<T> make_sinkhorn_kernels() {
  return {&lse_rows_range<V, S, T>, &lse_cols_range<V, S, T>, &plan_rows_range<V, S, T>};
}

}  // namespace
}  // namespace fk
