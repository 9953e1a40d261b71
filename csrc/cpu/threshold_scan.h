// The counting sweep of global_threshold (global_threshold.cpp) for one tensor of one model:
// keys |x - base| (float32 bits, < 2^31) above hi are counted, keys in [lo, hi] appended to a
// caller's buffer. Vectorised with the ISA's lanes; included by kernel_table.h (plain arrays only).
#pragma once
#include <type_traits>

#include "kernels.h"
#include "lanes.h"

namespace fk {
namespace {

// Returns the keys > hi in [begin, end), or -1 when more than cap - *found keys fall in [lo, hi].
template <class V, class S, class T>
int64_t threshold_scan_range(const ThresholdScanArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  const T* base = static_cast<const T*>(a.base);
  typename V::I above = V::iset1(0);
  typename S::I above_tail = S::iset1(0);
  bool overflow = false;
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    const auto tau = base ? L::sub(L::load(x + i), L::load(base + i)) : L::load(x + i);
    const auto key = L::abs_bits(tau);
    const auto over = L::igt(key, L::iset1(a.hi));
    if constexpr (std::is_same_v<L, V>)
      above = V::count_if(above, over);
    else
      above_tail = S::count_if(above_tail, over);
    const auto inside = L::mandnot(L::igt(key, L::iset1(a.lo - 1)), over);
    const int bits = L::movemask(inside);
    if (bits == 0) return;  // the common case: no key of this vector is a candidate
    int32_t keys[kMaxLaneWidth];
    L::store_i(keys, key);
    for (int u = 0; u < L::width; ++u) {
      if (!((bits >> u) & 1)) continue;
      if (*a.found >= a.cap) {
        overflow = true;
        return;
      }
      a.buffer[(*a.found)++] = uint32_t(keys[u]);
    }
  });
  return overflow ? -1 : V::ihsum(above) + S::ihsum(above_tail);
}

}  // namespace
}  // namespace fk
