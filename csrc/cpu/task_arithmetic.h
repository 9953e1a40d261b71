// task_arithmetic: out = base + sum_k w[k] * (xs[k] - base) (add_base false: the sum alone, from
// zero); task vectors are never stored.
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void task_arithmetic_range(const MergeArgs& a, int64_t begin, int64_t end) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* base = static_cast<const T*>(a.base);
  T* out = static_cast<T*>(a.out);
  const auto* w = weights<typename V::Elem>(a);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto b = L::load(base + i);
    prefetch_ahead<L>(base + i);
    for (int k = 0; k < a.n; ++k) prefetch_ahead<L>(xs[k] + i);
    auto acc = a.add_base ? b : L::set1(0);
    for (int k = 0; k < a.n; ++k) acc = L::fma(L::sub(L::load(xs[k] + i), b), L::set1(w[k]), acc);
    L::store(out + i, acc);
  });
}

}  // namespace
}  // namespace fk
