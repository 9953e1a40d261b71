// DELLA's element loops (della.cpp ranks and decides; these are its streaming passes), one ISA's
// vectors each. Included by each ISA's translation unit (kernel_table.h).
#pragma once
#include <algorithm>
#include <type_traits>

#include "kernels.h"
#include "lanes.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

// keys[j] = the float32 bits of |x[j] - base[j]| (|x[j]| where base is null), j < n (n >= 1);
// returns the bits in which some key differs from keys[0], and in range their smallest, largest and
// smallest nonzero (0: none).
template <class V, class S, class T>
uint32_t della_keys_range(const void* x_, const void* base_, int64_t n, uint32_t* keys, uint32_t* range) {
  const T* x = static_cast<const T*>(x_);
  const T* base = static_cast<const T*>(base_);
  int32_t* out = reinterpret_cast<int32_t*>(keys);
  const auto key_at = [&](auto lane, int64_t j) {
    using L = decltype(lane);
    return L::abs_bits(base ? L::sub(L::load(x + j), L::load(base + j)) : L::load(x + j));
  };
  const int32_t first = key_at(S{}, 0);
  typename V::I differ = V::iset1(0), lo = V::iset1(first), hi = lo;  // keys are < 2^31: signed order is theirs
  int32_t differ_s = 0, lo_s = first, hi_s = first;
  // k + (2^31 - 1), wrapping: 0 becomes the largest int32, a nonzero key ranks as k does below it
  const auto shifted = [](int32_t k) { return static_cast<int32_t>(uint32_t(k) + 0x7fffffffu); };
  typename V::I nonzero = V::iset1(shifted(first));
  int32_t nonzero_s = shifted(first);
  for_each_lane<V, S>(0, n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    prefetch_ahead<L>(x + j);
    if (base) prefetch_ahead<L>(base + j);
    const auto k = key_at(lane, j);
    L::store_i(out + j, k);
    if constexpr (std::is_same_v<L, V>) {
      differ = V::ior(differ, V::ixor(k, V::iset1(first)));
      lo = V::imin(lo, k);
      hi = V::imax(hi, k);
      nonzero = V::imin(nonzero, V::iadd(k, V::iset1(0x7fffffff)));
    } else {
      differ_s |= k ^ first;
      lo_s = std::min(lo_s, k);
      hi_s = std::max(hi_s, k);
      nonzero_s = std::min(nonzero_s, shifted(k));
    }
  });
  alignas(32) int32_t lanes[4][kMaxLaneWidth];
  V::store_i(lanes[0], differ);
  V::store_i(lanes[1], lo);
  V::store_i(lanes[2], hi);
  V::store_i(lanes[3], nonzero);
  for (int q = 0; q < V::width; ++q) {
    differ_s |= lanes[0][q];
    lo_s = std::min(lo_s, lanes[1][q]);
    hi_s = std::max(hi_s, lanes[2][q]);
    nonzero_s = std::min(nonzero_s, lanes[3][q]);
  }
  range[0] = uint32_t(lo_s);
  range[1] = uint32_t(hi_s);
  range[2] = uint32_t(nonzero_s) - 0x7fffffffu;
  return uint32_t(differ_s);
}

// draws[c] = mix32((first + c) ^ key) >> 8, c < n (first + n <= 2^32): the 24-bit draws of DELLA's
// hash (reference/random_mask.py uniform24) of the elements of one 2^32 span, key its hash key.
template <class L>
inline typename L::I della_draw(uint32_t first, int64_t c, uint32_t key) {
  const auto counter = L::iadd(L::iset1(static_cast<int32_t>(first + uint32_t(c))), L::iota());
  return L::template isrl<8>(mix32<L>(L::ixor(counter, L::iset1(static_cast<int32_t>(key)))));
}

// draws[c] = della_draw(first, c, key), c < n, held against the thresholds of the row's first and
// last rank (lo <= hi): keep[c] = draw < lo, the decision of every rank; the c with lo <= draw < hi,
// which their rank decides, are listed in order as index0 + c in mid (room for n + kMaxLaneWidth). Returns how many.
template <class V, class S>
int64_t della_draws_range(uint32_t first, int64_t n, uint32_t key, uint32_t lo, uint32_t hi, uint32_t index0,
                          uint32_t* draws, uint8_t* keep, uint32_t* mid) {
  int32_t* draw_at = reinterpret_cast<int32_t*>(draws);
  int32_t* mid_at = reinterpret_cast<int32_t*>(mid);
  int64_t count = 0;
  for_each_lane<V, S>(0, n, [&](auto lane, int64_t c) {
    using L = decltype(lane);
    const auto draw = della_draw<L>(first, c, key);
    L::store_i(draw_at + c, draw);
    const auto below = L::igt(L::iset1(int32_t(lo)), draw);  // draws, lo and hi are <= 2^24: signed order
    L::store_mask8(keep + c, below);
    const auto index = L::iadd(L::iset1(static_cast<int32_t>(index0 + uint32_t(c))), L::iota());
    count += L::compress_store(mid_at + count, index, L::mandnot(L::igt(L::iset1(int32_t(hi)), draw), below));
  });
  return count;
}

// The keep thresholds of ranks (DellaRankScale), each step rounded as rank_thresholds (della.cpp) rounds
// it: computed, where a table lookup is a gather (a 16-lane gather costs about as much as 16 loads).
template <class L>
inline typename L::I della_threshold(typename L::I rank, const DellaRankScale& s) {
  const auto rank_norm = L::div(L::to_float(rank), L::set1(s.last));
  const auto t = L::mul(L::add(L::set1(s.low), L::mul(rank_norm, L::set1(s.spread))), L::set1(16777216.f));
  return L::trunc_to_int(L::min(L::max(t, L::zero()), L::set1(16777216.f)));  // max: NaN becomes 0
}

// The decisions of the listed draws mid[0, count) of a row by their digit's range of ranks [start,
// end) (digits[c]: element c's digit; begin[v]: the keys of digits below v): keep[c] = draw < the
// threshold of rank start, and the c whose draw is neither below that nor at or above the threshold
// of rank end - 1 listed in exact. Returns how many, or -1 past cap (keep then partly written).
template <class V, class S>
int64_t della_decide_range(const uint32_t* mid, int64_t count, const uint32_t* digits_, const uint32_t* begin_,
                           const uint32_t* draws_, DellaRankScale scale, uint8_t* keep, uint32_t* exact, int64_t cap) {
  // all are below 2^31 (thresholds and draws: at most 2^24): signed order is theirs
  const auto ints = [](const uint32_t* p) { return reinterpret_cast<const int32_t*>(p); };
  const int32_t *digits = ints(digits_), *begin = ints(begin_), *draws = ints(draws_);
  int64_t n = 0;
  for_each_lane<V, S>(0, count, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    if (n < 0) return;
    const auto c = L::load_i(ints(mid) + i);
    const auto digit = L::gather(digits, c);
    const auto draw = L::gather(draws, c);
    const auto first = della_threshold<L>(L::gather(begin, digit), scale);
    const auto last = della_threshold<L>(L::iadd(L::gather(begin + 1, digit), L::iset1(-1)), scale);
    const auto kept = L::igt(first, draw);
    unsigned undecided = static_cast<unsigned>(L::movemask(L::mandnot(L::igt(last, draw), kept)));
    const unsigned kept_bits = static_cast<unsigned>(L::movemask(kept));
    alignas(64) int32_t at[kMaxLaneWidth];
    L::store_i(at, c);
    for (int l = 0; l < L::width; ++l) keep[at[l]] = static_cast<uint8_t>((kept_bits >> l) & 1u);
    for (; undecided != 0; undecided &= undecided - 1) {
      if (n == cap) {
        n = -1;
        return;
      }
      exact[n++] = static_cast<uint32_t>(at[__builtin_ctz(undecided)]);
    }
  });
  return n;
}

// The rank of key c among keys[0, n) in ascending order, equal keys by index: the keys before c
// that are not above it and the keys after c below it.
template <class V, class S>
int64_t della_rank_range(const uint32_t* keys_, int64_t n, int64_t c) {
  const int32_t* keys = reinterpret_cast<const int32_t*>(keys_);  // keys are < 2^31: signed order is theirs
  const int32_t key = keys[c];
  typename V::I above = V::iset1(0), below = V::iset1(0);
  int64_t above_s = 0, below_s = 0;
  for_each_lane<V, S>(0, c, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    const auto m = L::igt(L::load_i(keys + j), L::iset1(key));
    if constexpr (std::is_same_v<L, V>) above = V::count_if(above, m);
    else above_s += m;
  });
  for_each_lane<V, S>(c + 1, n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    const auto m = L::igt(L::iset1(key), L::load_i(keys + j));
    if constexpr (std::is_same_v<L, V>) below = V::count_if(below, m);
    else below_s += m;
  });
  return c - (V::ihsum(above) + above_s) + V::ihsum(below) + below_s;
}

// sums[0] += sum |tau|, sums[1] += sum of the kept |tau| (keep[j] != 0) over j < n, from the keys
// (float32 bits of |tau|): float sums over runs of kL1Run, added in double, as kept_l1_range sums.
template <class V, class S>
void della_l1_range(const uint32_t* keys, const uint8_t* keep, int64_t n, double* sums) {
  const auto magnitude = [keys](auto lane, int64_t j) {
    using L = decltype(lane);
    if constexpr (L::width == 1) return typename L::R(bits_to_float(keys[j]));
    else return L::load(reinterpret_cast<const float*>(keys + j));  // an unaligned vector load: no aliasing rule
  };
  for (int64_t j0 = 0; j0 < n; j0 += kL1Run) {
    typename V::R all = V::zero(), kept = V::zero();
    float all_tail = 0.f, kept_tail = 0.f;
    for_each_lane<V, S>(j0, std::min(n, j0 + kL1Run), [&](auto lane, int64_t j) {
      using L = decltype(lane);
      const auto mag = magnitude(lane, j);
      const auto kept_mag = L::keep_if(L::load_mask8(keep + j), mag);
      if constexpr (std::is_same_v<L, V>) {
        all = V::add(all, mag);
        kept = V::add(kept, kept_mag);
      } else {
        all_tail += mag;
        kept_tail += kept_mag;
      }
    });
    sums[0] += double(V::hsum(all)) + double(all_tail);
    sums[1] += double(V::hsum(kept)) + double(kept_tail);
  }
}

}  // namespace
}  // namespace fk
