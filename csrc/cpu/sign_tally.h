// TIES' sign tally over the elements kept by a magnitude threshold, one pass, nothing stored:
// per element s = sum_i kept_i (kept_i = tau_i where |tau_i| >= threshold_i, else 0; tau_i =
// x_i - base, float32, added in model order as sparse_merge's tally). counts[0] += #(s > 0) -
// #(s < 0); counts[1] += #(s == 0 while some kept_i != 0): the elements whose elected sign is the
// tie's. Semantics: fusion_kernels/reference/sparse_merge.py (sign_tally).
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void sign_tally_range(const MergeArgs& a, int64_t begin, int64_t end, int64_t* counts) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  int64_t balance = 0, ties = 0;
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto b = L::load(base + i), zero = L::zero();
    auto s = L::zero();
    auto any = L::fgt(zero, zero);  // all false
    for (int k = 0; k < a.n; ++k) {
      const auto tau = L::sub(L::load(xs[k] + i), b);
      // |tau| >= threshold on the float32 bit patterns (the key order: NaN ranks above inf)
      const auto keep = L::igt(L::abs_bits(tau), L::iset1(int32_t(float_to_bits(a.w32[k])) - 1));
      const auto kept = L::keep_if(keep, tau);
      s = L::add(s, kept);
      any = L::mor(any, L::mor(L::fgt(kept, zero), L::fgt(zero, kept)));
    }
    const auto up = L::fgt(s, zero), down = L::fgt(zero, s);
    balance += __builtin_popcount(unsigned(L::movemask(up))) - __builtin_popcount(unsigned(L::movemask(down)));
    ties += __builtin_popcount(unsigned(L::movemask(L::mandnot(any, L::mor(up, down)))));
  });
  counts[0] += balance;
  counts[1] += ties;
}

}  // namespace
}  // namespace fk
