// DELLA's element loops (della.cpp ranks and decides; these are its streaming passes), one ISA's
// vectors each. Included by each ISA's translation unit (kernel_table.h).
#pragma once
#include <type_traits>

#include "lanes.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

// keys[j] = the float32 bits of |x[j] - base[j]| (|x[j]| where base is null), j < n; returns the
// bits in which some key differs from keys[0].
template <class V, class S, class T>
uint32_t della_keys_range(const void* x_, const void* base_, int64_t n, uint32_t* keys) {
  if (n == 0) return 0;
  const T* x = static_cast<const T*>(x_);
  const T* base = static_cast<const T*>(base_);
  int32_t* out = reinterpret_cast<int32_t*>(keys);
  const auto key_at = [&](auto lane, int64_t j) {
    using L = decltype(lane);
    return L::abs_bits(base ? L::sub(L::load(x + j), L::load(base + j)) : L::load(x + j));
  };
  const int32_t first = key_at(S{}, 0);
  typename V::I differ_v = V::iset1(0);
  int32_t differ_s = 0;
  for_each_lane<V, S>(0, n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    const auto k = key_at(lane, j);
    L::store_i(out + j, k);
    if constexpr (std::is_same_v<L, V>) differ_v = V::ior(differ_v, V::ixor(k, V::iset1(first)));
    else differ_s |= k ^ first;
  });
  alignas(32) int32_t lanes[kMaxLaneWidth] = {};
  V::store_i(lanes, differ_v);
  for (int q = 0; q < V::width; ++q) differ_s |= lanes[q];
  return uint32_t(differ_s);
}

// draws[c] = mix32((first + c) ^ key) >> 8, c < n (first + n <= 2^32): the 24-bit draws of DELLA's
// hash (reference/random_mask.py uniform24) of the elements of one 2^32 span, key its hash key.
template <class V, class S>
void hash24_range(uint32_t first, int64_t n, uint32_t key, uint32_t* draws) {
  int32_t* out = reinterpret_cast<int32_t*>(draws);
  for_each_lane<V, S>(0, n, [&](auto lane, int64_t c) {
    using L = decltype(lane);
    const auto counter = L::iadd(L::iset1(static_cast<int32_t>(first + uint32_t(c))), L::iota());
    L::store_i(out + c, L::template isrl<8>(mix32<L>(L::ixor(counter, L::iset1(static_cast<int32_t>(key))))));
  });
}

}  // namespace
}  // namespace fk
