// Reinforced Agent Merging (RAM, RAM+), fused: every task vector tau_k = x_k - base is read once per
// pass and never stored. Semantics: fusion_kernels/reference/composite.py (ram, ram_counts).
//   kept_k = |tau_k| > eps,  c = sum_k kept_k
//   out = base + (c == 1 ? sum_k kept_k * tau_k * scale_k : sum_k kept_k * tau_k / max(c, 1))
// Included by each ISA's translation unit (kernel_table.h): plain arrays only, no library code.
#pragma once
#include <algorithm>
#include <type_traits>

#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void ram_merge_range(const MergeArgs& a, int64_t begin, int64_t end) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  T* out = static_cast<T*>(a.out);
  const auto* scale = weights<typename V::Elem>(a);
  const auto threshold = eps<typename V::Elem>(a);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto b = L::load(base + i), one = L::set1(1);
    prefetch_ahead<L>(base + i);
    auto total = L::zero(), alone = L::zero(), count = L::zero();
    for (int k = 0; k < a.n; ++k) {
      prefetch_ahead<L>(xs[k] + i);
      const auto tau = L::sub(L::load(xs[k] + i), b);
      const auto keep = L::fgt(L::abs(tau), L::set1(threshold));
      total = L::add(total, L::keep_if(keep, tau));
      alone = L::add(alone, L::keep_if(keep, L::mul(tau, L::set1(scale[k]))));
      count = L::add(count, L::one_if(keep));
    }
    const auto merged = L::select(L::feq(count, one), alone, L::div(total, L::max(count, one)));
    L::store(out + i, L::add(b, merged));
  });
}

constexpr int64_t kRamRun = 1024;  // elements whose keep counts sit in a stack buffer (exact as floats)

// counts[2k] += elements of [begin, end) that model k keeps and another model keeps too;
// counts[2k + 1] += those only model k keeps. Per run of kRamRun elements: the keep count of each
// element first, then one pass per model over the (cache-resident) run.
template <class V, class S, class T>
void ram_counts_range(const MergeArgs& a, int64_t begin, int64_t end, int64_t* counts) {
  using E = typename V::Elem;
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  const E threshold = eps<E>(a);
  E count_of[kRamRun];
  for (int64_t r0 = begin; r0 < end; r0 += kRamRun) {
    const int64_t r1 = std::min(end, r0 + kRamRun);
    for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const auto b = L::load(base + i);
      prefetch_ahead<L>(base + i);
      auto count = L::zero();
      for (int k = 0; k < a.n; ++k) prefetch_ahead<L>(xs[k] + i);
      for (int k = 0; k < a.n; ++k)
        count = L::add(count, L::one_if(L::fgt(L::abs(L::sub(L::load(xs[k] + i), b)), L::set1(threshold))));
      L::store(count_of + (i - r0), count);
    });
    for (int k = 0; k < a.n; ++k) {
      typename V::R shared = V::zero(), alone = V::zero();
      typename S::R shared_tail = S::zero(), alone_tail = S::zero();
      for_each_lane<V, S>(r0, r1, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        const auto one = L::set1(1), c = L::load(count_of + (i - r0));
        const auto keep = L::fgt(L::abs(L::sub(L::load(xs[k] + i), L::load(base + i))), L::set1(threshold));
        const auto with_others = L::one_if(L::mand(keep, L::fgt(c, one)));
        const auto by_itself = L::one_if(L::mand(keep, L::feq(c, one)));
        if constexpr (std::is_same_v<L, V>) {
          shared = V::add(shared, with_others);
          alone = V::add(alone, by_itself);
        } else {
          shared_tail = S::add(shared_tail, with_others);
          alone_tail = S::add(alone_tail, by_itself);
        }
      });
      counts[2 * k] += int64_t(V::hsum(shared)) + int64_t(S::hsum(shared_tail));
      counts[2 * k + 1] += int64_t(V::hsum(alone)) + int64_t(S::hsum(alone_tail));
    }
  }
}

}  // namespace
}  // namespace fk
