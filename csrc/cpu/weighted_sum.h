// weighted_sum: out = sum_k w[k] * xs[k], one pass, accumulated in the lane's float type.
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void weighted_sum_range(const MergeArgs& a, int64_t begin, int64_t end) {
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  T* out = static_cast<T*>(a.out);
  const auto* w = weights<typename V::Elem>(a);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    for (int k = 0; k < a.n; ++k) prefetch_ahead<L>(xs[k] + i);
    auto acc = L::mul(L::load(xs[0] + i), L::set1(w[0]));
    for (int k = 1; k < a.n; ++k) acc = L::fma(L::load(xs[k] + i), L::set1(w[k]), acc);
    L::store(out + i, acc);
  });
}

}  // namespace
}  // namespace fk
