// SCE's statistics (select, calculate), one pass each over the inputs, no task vector stored.
// Semantics: fusion_kernels/reference/composite.py (sce_variance, sce_energies), in its float32
// steps and order, so that the variances are bit for bit the reference's (they decide the top-k):
//   tau_k = x_k - base,  mean = (tau_0 + ... + tau_{n-1}) / n,
//   var = ((tau_0 - mean)^2 + ... + (tau_{n-1} - mean)^2) / n          (sce_variance_range)
//   energy_k = sum over kept elements of tau_k^2                       (sce_energies_range)
//   kept = the k largest var given the k-th, t: var > t and those equal to t below the tie cut,
//   the flat index past the last tie kept (sce_tally_range finds it where the caller has not),
//   with the energies over it (sce_select_range)
// Included by each ISA's translation unit (kernel_table.h): plain arrays only, no library code.
#pragma once
#include <algorithm>
#include <type_traits>

#include "lanes.h"

namespace fk {
namespace {

constexpr int64_t kSceRun = 1024;  // elements per partial sum: exact int32 counts, short float sums

// a.out: float32 variances written; nonzero[0] += how many of them are not 0 (NaN counts).
template <class V, class S, class T>
void sce_variance_range(const MergeArgs& a, int64_t begin, int64_t end, int64_t* nonzero) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  float* var = static_cast<float*>(a.out);
  for (int64_t r0 = begin; r0 < end; r0 += kSceRun) {
    const int64_t r1 = std::min(end, r0 + kSceRun);
    typename V::I count = V::iset1(0);
    typename S::I count_tail = S::iset1(0);
    for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto b = L::load(base + i), n = L::set1(float(a.n));
      prefetch_ahead<L>(base + i);
      for (int k = 0; k < a.n; ++k) prefetch_ahead<L>(xs[k] + i);
      auto total = L::sub(L::load(xs[0] + i), b);
      for (int k = 1; k < a.n; ++k) total = L::add(total, L::sub(L::load(xs[k] + i), b));
      const auto mean = L::div(total, n);
      auto squares = L::zero();
      for (int k = 0; k < a.n; ++k) {
        const auto d = L::sub(L::sub(L::load(xs[k] + i), b), mean);
        squares = L::add(squares, L::mul(d, d));
      }
      const auto v = L::div(squares, n);
      L::store(var + i, v);
      const auto is_nonzero = L::mandnot(L::mall(), L::feq(v, L::zero()));
      if constexpr (std::is_same_v<L, V>)
        count = V::count_if(count, is_nonzero);
      else
        count_tail = S::count_if(count_tail, is_nonzero);
    });
    nonzero[0] += V::ihsum(count) + S::ihsum(count_tail);
  }
}

// a.mask: the kept elements (one byte each; null: all); sums[k] += sum of kept tau_k^2, the squares
// added in float32 over runs of kSceRun elements and the runs in float64.
template <class V, class S, class T>
void sce_energies_range(const MergeArgs& a, int64_t begin, int64_t end, double* sums) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  for (int64_t r0 = begin; r0 < end; r0 += kSceRun) {
    const int64_t r1 = std::min(end, r0 + kSceRun);
    for (int k = 0; k < a.n; ++k) {
      typename V::R total = V::zero();
      typename S::R total_tail = S::zero();
      for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        auto tau = L::sub(L::load(xs[k] + i), L::load(base + i));
        if (a.mask != nullptr) tau = L::keep_if(L::load_mask8(a.mask + i), tau);
        if constexpr (std::is_same_v<L, V>)
          total = V::add(total, V::mul(tau, tau));
        else
          total_tail = S::add(total_tail, S::mul(tau, tau));
      });
      sums[k] += double(V::hsum(total)) + double(S::hsum(total_tail));
    }
  }
}

// a.fs[0]: the float32 variances, a.eps32: the threshold t. counts[0] += those above t (NaN
// included: it ranks above every number), counts[1] += those equal to t.
template <class V, class S, class T>
void sce_tally_range(const MergeArgs& a, int64_t begin, int64_t end, int64_t* counts) {
  const float* var = static_cast<const float*>(a.fs[0]);
  for (int64_t r0 = begin; r0 < end; r0 += kSceRun) {
    const int64_t r1 = std::min(end, r0 + kSceRun);
    typename V::I above = V::iset1(0), equal = V::iset1(0);
    typename S::I above_tail = S::iset1(0), equal_tail = S::iset1(0);
    for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto v = L::load(var + i), t = L::set1(a.eps32);
      if constexpr (std::is_same_v<L, V>) {
        above = V::count_if(above, V::mandnot(V::mall(), V::fge(t, v)));
        equal = V::count_if(equal, V::feq(v, t));
      } else {
        above_tail = S::count_if(above_tail, S::mandnot(S::mall(), S::fge(t, v)));
        equal_tail = S::count_if(equal_tail, S::feq(v, t));
      }
    });
    counts[0] += V::ihsum(above) + S::ihsum(above_tail);
    counts[1] += V::ihsum(equal) + S::ihsum(equal_tail);
  }
}

// The mask of [begin, end) written into a.out (a byte each): the variances above a.eps32 (NaN
// included) and those equal to it at a flat index below `cut`; sums[k] += sum of tau_k^2 over it,
// as sce_energies_range; sums[n] += its count.
template <class V, class S, class T>
void sce_select_range(const MergeArgs& a, int64_t begin, int64_t end, int64_t cut, double* sums) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  const float* var = static_cast<const float*>(a.fs[0]);
  uint8_t* mask = static_cast<uint8_t*>(a.out);
  int64_t kept = 0;
  for (int64_t r0 = begin; r0 < end; r0 += kSceRun) {
    const int64_t r1 = std::min(end, r0 + kSceRun);
    for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto v = L::load(var + i), t = L::set1(a.eps32);
      prefetch_ahead<L>(var + i);
      auto keep = L::mandnot(L::mall(), L::fge(t, v));
      if (i < cut) {  // the ties below the cut kept (bf16 variances tie at the threshold in many vectors)
        auto tied = L::feq(v, t);
        if (cut - i < L::width) tied = L::mand(tied, L::igt(L::iset1(int32_t(cut - i)), L::iota()));
        keep = L::mor(keep, tied);
      }
      L::store_mask8(mask + i, keep);
      kept += __builtin_popcount(unsigned(L::movemask(keep)));
    });
    for (int k = 0; k < a.n; ++k) {
      typename V::R total = V::zero();
      typename S::R total_tail = S::zero();
      for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        prefetch_ahead<L>(xs[k] + i);
        prefetch_ahead<L>(base + i);
        const auto tau = L::keep_if(L::load_mask8(mask + i), L::sub(L::load(xs[k] + i), L::load(base + i)));
        if constexpr (std::is_same_v<L, V>)
          total = V::add(total, V::mul(tau, tau));
        else
          total_tail = S::add(total_tail, S::mul(tau, tau));
      });
      sums[k] += double(V::hsum(total)) + double(S::hsum(total_tail));
    }
  }
  sums[a.n] += double(kept);
}

}  // namespace
}  // namespace fk
