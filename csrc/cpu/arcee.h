// arcee_fusion's importance (mergekit), per row of the last dim, in float32 (float64 for float64):
//   p = softmax(x) + eps,  q = softmax(base) + eps,  kl = sum_c p_c * ln(p_c / q_c)
//   importance = |x - base| * kl
// Each row is read from memory twice (maxima and x - base, then exponentials), x - base and the
// exponentials kept in scratch rows between the passes; the row sums are taken in float64. A
// fine-tune's rows take a fast path (below) whose KL is second order in every rounding; the others
// correct the KL for the rounding of the softmax normalisers. A row holding a non-finite value is
// counted and left unwritten: the caller takes the reference for it. Semantics: fusion_kernels/reference/composite.py (arcee_importance).
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
constexpr int kSumLanes = 32;  // four 8-double vectors: the additions of one do not wait on the last
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

// The fast path, for float32 rows of a fine-tune: (1) the task vector nearly flat, |(x - base) -
// (max x - max base)| <= kNear everywhere, so e^(x - max x) = e^(base - max base) * e^r with r that
// difference, e^r by its degree-4 Taylor polynomial (relative error <= kNear^5/120 = 2.5e-10): one
// exponential an element where there were two; (2) every softmax entry s >= 128 eps, so t = eps/s <=
// 2^-7 and l = ln(p/q) = (ln s_x - ln s_b) + log1p(t_x) - log1p(t_b) = (x - base) - C + the series
// of the log1p difference to the cube (C = max x - max base + ln(S_x/S_b), in float64; relative error
// t^3/2 of a term of order t): no logarithm. Then |l| <= 2 kNear + O(t), and since sum p = sum q,
// KL = sum p*(l + e^-l - 1), each term p*(l^2/2 - l^3/6 + l^4/24 - l^5/120) (relative error l^4/360 <=
// 4e-8): every term >= 0, and an error g shared by all l (the rounding of C, of the normalisers)
// moves the sum by g * sum p*(1 - e^-l) = 0 to first order, where sum p*l would move by g itself.
constexpr double kNear = 1.0 / 32;
constexpr double kSmallT = 1.0 / 128;

template <class V, class S, class T>
int64_t arcee_importance_range(void* out_ptr, const void* base_ptr, const void* x_ptr, int64_t cols, int64_t row_begin,
                               int64_t row_end, double eps_value) {
  using E = typename V::Elem;
  constexpr bool kFloat = std::is_same_v<E, float>;  // float64 data keeps the plain formula everywhere
  const T* base = static_cast<const T*>(base_ptr);
  const T* x = static_cast<const T*>(x_ptr);
  E* out = static_cast<E*>(out_ptr);
  const E eps = E(eps_value);
  E* ex = new E[size_t(3 * cols)];
  E* eb = ex + cols;
  E* dd = eb + cols;  // x - base, as the passes after the first take it
  int64_t skipped = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * cols;
    const T* br = base + r * cols;
    LaneAcc<V, S> mx(-INFINITY), mb(-INFINITY), finite(0);  // x - x is 0 for finite x, NaN otherwise
    LaneAcc<V, S> up(-INFINITY), down(-INFINITY);          // max (x - b), max (b - x)
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto xv = L::load(xr + i), bv = L::load(br + i);
      prefetch_ahead<L>(xr + i);
      prefetch_ahead<L>(br + i);
      const auto d = L::sub(xv, bv);
      L::store(dd + i, d);
      mx.template of<L>() = L::max(mx.template of<L>(), xv);
      mb.template of<L>() = L::max(mb.template of<L>(), bv);
      finite.template of<L>() = L::add(finite.template of<L>(), L::add(L::sub(xv, xv), L::sub(bv, bv)));
      if constexpr (kFloat) {
        up.template of<L>() = L::max(up.template of<L>(), d);
        down.template of<L>() = L::max(down.template of<L>(), L::sub(L::zero(), d));
      }
    });
    if (!(finite.sum() == E(0))) {
      ++skipped;
      continue;
    }
    const E max_x = mx.max(), max_b = mb.max();
    const E shift_max = max_x - max_b;
    const bool near = kFloat && double(up.max()) - double(shift_max) <= kNear &&
                      double(down.max()) + double(shift_max) <= kNear;
    LaneAcc<V, S> least_x(-INFINITY), least_b(-INFINITY);  // -min e_x, -min e_b
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto b_exp = L::exp(L::sub(L::load(br + i), L::set1(max_b)));
      typename L::R x_exp;
      if (near) {
        const auto t = L::sub(L::load(dd + i), L::set1(shift_max));
        auto poly = L::fma(t, L::set1(E(1.0 / 24)), L::set1(E(1.0 / 6)));
        poly = L::fma(poly, t, L::set1(E(0.5)));
        poly = L::fma(poly, t, L::set1(E(1)));
        poly = L::fma(poly, t, L::set1(E(1)));
        x_exp = L::mul(b_exp, poly);
      } else {
        x_exp = L::exp(L::sub(L::load(xr + i), L::set1(max_x)));
      }
      L::store(ex + i, x_exp);
      L::store(eb + i, b_exp);
      if constexpr (kFloat) {
        least_x.template of<L>() = L::max(least_x.template of<L>(), L::sub(L::zero(), x_exp));
        least_b.template of<L>() = L::max(least_b.template of<L>(), L::sub(L::zero(), b_exp));
      }
    });
    const double sum_x = float64_sum(ex, cols), sum_b = float64_sum(eb, cols);
    const E inv_x = E(1.0 / sum_x), inv_b = E(1.0 / sum_b);
    const double floor_t = 1.01 * eps_value / kSmallT;  // e/S >= this: t = eps/s <= kSmallT, with a margin
    const bool fast = near && -double(least_x.max()) >= floor_t * sum_x && -double(least_b.max()) >= floor_t * sum_b;
    double divergence64;
    if (fast) {
      const E c = E((double(max_x) - double(max_b)) + (std::log(sum_x) - std::log(sum_b)));
      for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {  // ex <- p * (l + e^-l - 1)
        using L = decltype(lane);
        const auto sx = L::mul(L::load(ex + i), L::set1(inv_x));
        const auto sb = L::mul(L::load(eb + i), L::set1(inv_b));
        const auto p = L::fma_once(L::load(ex + i), L::set1(inv_x), L::set1(eps));
        const auto u = L::div(L::set1(eps), L::mul(sx, sb));
        const auto tx = L::mul(u, sb), tb = L::mul(u, sx);
        const auto squares = L::fma(tx, L::add(tx, tb), L::mul(tb, tb));  // tx^2 + tx tb + tb^2
        auto series = L::fma(squares, L::set1(E(1.0 / 3)), L::set1(E(1)));
        series = L::fma(L::add(tx, tb), L::set1(E(-0.5)), series);
        const auto l = L::fma(L::sub(tx, tb), series, L::sub(L::load(dd + i), L::set1(c)));
        auto f = L::fma(l, L::set1(E(-1.0 / 120)), L::set1(E(1.0 / 24)));
        f = L::fma(f, l, L::set1(E(-1.0 / 6)));
        f = L::fma(f, l, L::set1(E(0.5)));
        L::store(ex + i, L::mul(p, L::mul(L::mul(l, l), f)));
      });
      divergence64 = float64_sum(ex, cols);
    } else {
      // p = e_x * (1/S_x) + eps rounded once (so its rounding errors are independent), likewise q; the
      // rounding of 1/S_x to E scales every p of the row alike, by 1 + d_x, which would shift the KL
      // by d_x - d_b, as much as the KL of two close vectors: the first-order terms are taken back in
      // float64, sum p*ln(p'/p) = d_x * sum(p - eps) and sum p*ln(q'/q) = d_b * sum p*(1 - eps/q), where
      // sum p = 1 + d_x + cols*eps up to rounding.
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
      divergence64 = float64_sum(ex, cols) - shift;
    }
    const E divergence = E(divergence64);
    E* o = out + r * cols;
    for_each_lane<V, S>(0, cols, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      L::store(o + i, L::mul(L::abs(L::load(dd + i)), L::set1(divergence)));
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
