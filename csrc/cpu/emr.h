// EMR's elect, mask and rescale statistics in one pass per run of elements (no task vector is
// stored): tau_k = x_k - base, sigma = sign(sum_k tau_k) (a zero sum counts as negative),
// unified = sigma * max |tau_k| over the tau_k agreeing with sigma, mask_k = tau_k * sigma > 0;
// sums[2k] += sum |tau_k|, sums[2k + 1] += sum |mask_k * unified|. Semantics:
// fusion_kernels/reference/emr.py. Included by each ISA's translation unit (plain arrays only).
#pragma once
#include <algorithm>
#include <type_traits>

#include "kernels.h"
#include "lanes.h"

namespace fk {
namespace {

constexpr int64_t kEmrRun = 1024;  // elements whose sign and unified value wait in stack buffers

template <class V, class S, class T>
void emr_range(const EmrArgs& a, int64_t begin, int64_t end, double* sums) {
  using E = typename V::Elem;
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  T* unified = static_cast<T*>(a.unified);
  E sign_of[kEmrRun], unified_of[kEmrRun];
  for (int64_t r0 = begin; r0 < end; r0 += kEmrRun) {
    const int64_t r1 = std::min(end, r0 + kEmrRun);
    for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto b = L::load(base + i), zero = L::zero();
      auto total = L::zero();
      for (int k = 0; k < a.n; ++k) total = L::add(total, L::sub(L::load(xs[k] + i), b));
      const auto sign = L::select(L::fgt(total, zero), L::set1(1), L::set1(-1));
      auto best = L::zero();
      for (int k = 0; k < a.n; ++k) {
        const auto tau = L::sub(L::load(xs[k] + i), b);
        best = L::max(best, L::keep_if(L::fgt(L::mul(tau, sign), zero), L::abs(tau)));
      }
      const auto u = L::mul(best, sign);
      L::store(unified + i, u);
      L::store(sign_of + (i - r0), sign);
      L::store(unified_of + (i - r0), u);
    });
    for (int k = 0; k < a.n; ++k) {
      uint8_t* mask = a.masks[k];
      typename V::R all = V::zero(), kept = V::zero();
      typename S::R all_tail = S::zero(), kept_tail = S::zero();
      for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        const auto tau = L::sub(L::load(xs[k] + i), L::load(base + i));
        const auto agree = L::fgt(L::mul(tau, L::load(sign_of + (i - r0))), L::zero());
        L::store_mask8(mask + i, agree);
        const auto masked = L::keep_if(agree, L::abs(L::load(unified_of + (i - r0))));
        if constexpr (std::is_same_v<L, V>) {
          all = V::add(all, V::abs(tau));
          kept = V::add(kept, masked);
        } else {
          all_tail = S::add(all_tail, S::abs(tau));
          kept_tail = S::add(kept_tail, masked);
        }
      });
      sums[2 * k] += double(V::hsum(all)) + double(S::hsum(all_tail));
      sums[2 * k + 1] += double(V::hsum(kept)) + double(S::hsum(kept_tail));
    }
  }
}

}  // namespace
}  // namespace fk
