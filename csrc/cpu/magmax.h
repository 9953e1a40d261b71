// MagMax, fused: per element the task vector tau_k = x_k - base of largest magnitude (a later
// model wins a tie), out = base + lam * it; no task vector is stored. Semantics:
// fusion_kernels/reference/magmax.py. Included by each ISA's translation unit (kernel_table.h).
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void magmax_range(const MergeArgs& a, int64_t begin, int64_t end) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  T* out = static_cast<T*>(a.out);
  const auto lam = weights<typename V::Elem>(a)[0];
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto b = L::load(base + i);
    auto best = L::sub(L::load(xs[0] + i), b);
    for (int k = 1; k < a.n; ++k) {
      const auto tau = L::sub(L::load(xs[k] + i), b);
      best = L::select(L::fge(L::abs(tau), L::abs(best)), tau, best);
    }
    L::store(out + i, L::add(b, L::mul(best, L::set1(lam))));
  });
}

}  // namespace
}  // namespace fk
