// nearswap (mergekit), fused: per element, in float32 (float64 for float64 data),
//   w = clamp(t / max(|base - x|, 1e-6), 0, 1),   out = lerp(base, x, w)
// with torch's lerp: w < 0.5 ? base + w * (x - base) : x + (w - 1) * (x - base), each one fused
// multiply-add. NaN inputs give NaN. Semantics: fusion_kernels/reference/composite.py (nearswap).
// a.xs[0] = x, a.eps = t. Included by each ISA's translation unit (kernel_table.h).
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void nearswap_range(const MergeArgs& a, int64_t begin, int64_t end) {
  using E = typename V::Elem;
  const T* x = static_cast<const T*>(a.xs[0]);
  const T* base = static_cast<const T*>(a.base);
  T* out = static_cast<T*>(a.out);
  const E t = eps<E>(a);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto b = L::load(base + i), v = L::load(x + i), one = L::set1(1);
    prefetch_ahead<L>(base + i);
    prefetch_ahead<L>(x + i);
    const auto gap = L::max(L::set1(E(1e-6)), L::abs(L::sub(b, v)));  // max(c, NaN) is NaN
    auto w = L::max(L::zero(), L::mul(L::div(one, gap), L::set1(t)));
    w = L::select(L::fgt(w, one), one, w);
    const auto small = L::fgt(L::set1(E(0.5)), w);
    const auto coeff = L::select(small, w, L::sub(w, one));
    L::store(out + i, L::fma_once(coeff, L::sub(v, b), L::select(small, b, v)));
  });
}

}  // namespace
}  // namespace fk
