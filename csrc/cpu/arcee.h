// arcee_fusion's importance (mergekit), per row of the last dim, in float32 (float64 for float64):
//   p = softmax(x) + eps,  q = softmax(base) + eps,  kl = sum_c p_c * ln(p_c / q_c)
//   importance = |x - base| * kl
// Each row is read from memory twice (maxima, then exponentials), its exponentials kept in a scratch
// row between the passes; the row sums are taken in float64, and the KL is corrected for the
// rounding of the softmax normalisers (see below). A row holding a non-finite value is counted and
// left unwritten: the caller takes the reference for it. Semantics: fusion_kernels/reference/composite.py (arcee_importance).
// Included by each ISA's translation unit (kernel_table.h): plain arrays only, no library code.
#pragma once
#include <cmath>
#include <type_traits>

#include "lanes.h"

namespace fk {
namespace {

// One accumulator per lane type: the vector body's and the scalar tail's.
template <class V, class S>
struct LaneAcc {
  typename V::R v;
  typename S::R s;
  LaneAcc(typename V::Elem init) : v(V::set1(init)), s(S::set1(init)) {}
  template <class L>
  auto& of() {
    if constexpr (std::is_same_v<L, V>) return v;
    else return s;
  }
  typename V::Elem sum() const { return V::hsum(v) + S::hsum(s); }
  typename V::Elem max() const {
    const auto a = V::hmax(v), b = S::hmax(s);
    return a > b ? a : b;
  }
};

// Σ v[0, n) in float64, kSumLanes independent partial sums (vectorisable without reassociation). The
// softmax normalisers and the KL are sums of thousands of terms whose float32 rounding would move the
// KL of two close vectors by as much as its value.
constexpr int kSumLanes = 8;
template <class E>
double float64_sum(const E* v, int64_t n) {
  double acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += double(v[i + l]);
  for (; i < n; ++i) acc[0] += double(v[i]);
  double total = 0.0;
  for (double a : acc) total += a;
  return total;
}

template <class V, class S, class T>
int64_t arcee_importance_range(void* out_ptr, const void* base_ptr, const void* x_ptr, int64_t cols, int64_t row_begin,
                               int64_t row_end, double eps_value) {
  using E = typename V::Elem;
  const T* base = static_cast<const T*>(base_ptr);
  const T* x = static_cast<const T*>(x_ptr);
  E* out = static_cast<E*>(out_ptr);
  const E eps = E(eps_value);
  E* ex = new E[size_t(2 * cols)];
  E* eb = ex + cols;
  int64_t skipped = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * cols;
    const T* br = base + r * cols;
    LaneAcc<V, S> mx(-INFINITY), mb(-INFINITY), finite(0);  // x - x is 0 for finite x, NaN otherwise
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto xv = L::load(xr + i), bv = L::load(br + i);
      mx.template of<L>() = L::max(mx.template of<L>(), xv);
      mb.template of<L>() = L::max(mb.template of<L>(), bv);
      finite.template of<L>() = L::add(finite.template of<L>(), L::add(L::sub(xv, xv), L::sub(bv, bv)));
    });
    if (!(finite.sum() == E(0))) {
      ++skipped;
      continue;
    }
    const E max_x = mx.max(), max_b = mb.max();
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      L::store(ex + i, L::exp(L::sub(L::load(xr + i), L::set1(max_x))));
      L::store(eb + i, L::exp(L::sub(L::load(br + i), L::set1(max_b))));
    });
    // p = e_x * (1/S_x) + eps rounded once (so its rounding errors are independent), likewise q; the
    // rounding of 1/S_x to E scales every p of the row alike, by 1 + d_x, which would shift the KL
    // by d_x - d_b, as much as the KL of two close vectors: the first-order terms are taken back in
    // float64, sum p*ln(p'/p) = d_x * sum(p - eps) and sum p*ln(q'/q) = d_b * sum p*(1 - eps/q), where
    // sum p = 1 + d_x + cols*eps up to rounding.
    const double sum_x = float64_sum(ex, cols), sum_b = float64_sum(eb, cols);
    const E inv_x = E(1.0 / sum_x), inv_b = E(1.0 / sum_b);
    const double d_x = double(inv_x) * sum_x - 1.0, d_b = double(inv_b) * sum_b - 1.0;
    LaneAcc<V, S> ratios(0);
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {  // ex <- p * ln(p/q)
      using L = decltype(lane);
      const auto p = L::fma_once(L::load(ex + i), L::set1(inv_x), L::set1(eps));
      const auto q = L::fma_once(L::load(eb + i), L::set1(inv_b), L::set1(eps));
      const auto ratio = L::div(p, q);
      ratios.template of<L>() = L::add(ratios.template of<L>(), ratio);
      L::store(ex + i, L::mul(p, L::log(ratio)));
    });
    const double sum_p = 1.0 + d_x + double(cols) * eps_value;
    const double shift = d_x * (1.0 + d_x) - d_b * (sum_p - eps_value * double(ratios.sum()));
    const E divergence = E(float64_sum(ex, cols) - shift);
    E* o = out + r * cols;
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      L::store(o + i, L::mul(L::abs(L::sub(L::load(xr + i), L::load(br + i))), L::set1(divergence)));
    });
  }
  delete[] ex;
  return skipped;
}

// out = importance >= cut ? x : base, elementwise; the chosen element's bits copied as they are
// (branch-free on the bits: the choice is unpredictable). a.xs[0] = x, a.fs[0] = the importance
// (float32; float64 for float64 data), a.eps = the cut.
template <class V, class S, class T>
void arcee_select_range(const MergeArgs& a, int64_t begin, int64_t end) {
  using E = typename V::Elem;
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  const U* x = static_cast<const U*>(a.xs[0]);
  const U* base = static_cast<const U*>(a.base);
  const E* importance = static_cast<const E*>(a.fs[0]);
  U* out = static_cast<U*>(a.out);
  const E cut = eps<E>(a);
  for (int64_t i = begin; i < end; ++i) {
    const U keep = U(U(0) - U(importance[i] >= cut));
    out[i] = U((x[i] & keep) | (base[i] & U(~keep)));
  }
}

}  // namespace
}  // namespace fk
