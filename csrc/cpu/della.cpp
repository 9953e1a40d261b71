// Per model and row: rank |tau| along the row, ascending with ties by index (a stable LSD radix
// sort of the float32 bit patterns over the bits in which they differ, see stable_order); the element
// of rank r is kept with probability p = (density - eps) + 2·eps·r/(cols - 1), drawn from the DARE
// hash at its flat index: keep = draw24 < floor(p·2^24), every step rounded as the reference does.
#include "della.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "lanes.h"
#include "runtime.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int64_t kRowsPerTask = 16;

// The row's |tau| keys; returns the bits in which some key differs from the first.
template <class T>
uint32_t row_keys(const TaskSource& s, int model, int64_t row, int64_t cols, uint32_t* keys) {
  const T* x = static_cast<const T*>(s.xs[size_t(model)]) + row * cols;
  const T* b = s.base ? static_cast<const T*>(s.base) + row * cols : nullptr;
  for (int64_t j = 0; j < cols; ++j) {
    const float tau = b ? ScalarLane::load(x + j) - ScalarLane::load(b + j) : ScalarLane::load(x + j);
    keys[j] = float_to_bits(tau) & 0x7fffffffu;
  }
  uint32_t varying = 0;
  for (int64_t j = 0; j < cols; ++j) varying |= keys[j] ^ keys[0];
  return varying;
}

constexpr int kMaxDigitBits = 10;  // the single pass's digit: 2^10 buckets (4 parts' counters: 16 KB)

// One stable counting pass on the kBits-bit digit at `shift` of keys[src[k]]: dst = src ordered by
// that digit (a compile-time width: the byte passes run a third faster than with a run-time one).
// src is counted and scattered as four consecutive parts side by side, each with its own positions
// (a part's elements of a bucket after those of the parts before it), so that four independent
// chains of increments run where one would stall on the few buckets of an exponent.
template <int kBits>
void counting_pass(const uint32_t* keys, int64_t cols, int shift, const uint32_t* src, uint32_t* dst) {
  constexpr int kParts = 4;
  int64_t begin[kParts + 1];
  for (int q = 0; q <= kParts; ++q) begin[q] = q * cols / kParts;  // lengths differ by at most one
  const int64_t shortest = cols / kParts, longest = (cols + kParts - 1) / kParts;
  constexpr uint32_t kBuckets = uint32_t(1) << kBits;
  uint32_t at[kParts][kBuckets] = {};
  const auto bucket = [&](int64_t k) { return (keys[src[k]] >> shift) & (kBuckets - 1); };
  const auto each = [&](auto&& f) {
    for (int64_t k = 0; k < shortest; ++k)
      for (int q = 0; q < kParts; ++q) f(q, begin[q] + k);
    for (int64_t k = shortest; k < longest; ++k)
      for (int q = 0; q < kParts; ++q)
        if (begin[q] + k < begin[q + 1]) f(q, begin[q] + k);
  };
  each([&](int q, int64_t k) { ++at[q][bucket(k)]; });
  uint32_t sum = 0;
  for (uint32_t v = 0; v < kBuckets; ++v)
    for (auto& counts : at) sum += std::exchange(counts[v], sum);
  each([&](int q, int64_t k) { dst[at[q][bucket(k)]++] = src[k]; });
}

// Orders the indices run[0, length) by the bytes of their keys at `shifts` (highest first), stably:
// an LSD counting pass per byte, lowest first.
void byte_passes(const uint32_t* keys, uint32_t* run, int64_t length, const int* shifts, int bytes, uint32_t* spare) {
  uint32_t *src = run, *dst = spare;
  for (int b = bytes - 1; b >= 0; --b) {
    counting_pass<8>(keys, length, shifts[b], src, dst);
    std::swap(src, dst);
  }
  if (src != run) std::memcpy(run, src, size_t(length) * sizeof(uint32_t));
}

// Sorts the run of indices by key, stably (they arrive in index order, their keys equal in every
// byte above `shifts`): insertion for a short run, else byte_passes.
void sort_run(const uint32_t* keys, uint32_t* run, int64_t length, const int* shifts, int bytes, uint32_t* spare) {
  if (length > 32) return byte_passes(keys, run, length, shifts, bytes, spare);
  for (int64_t i = 1; i < length; ++i) {
    const uint32_t moving = run[i];
    int64_t j = i;
    for (; j > 0 && keys[run[j - 1]] > keys[moving]; --j) run[j] = run[j - 1];
    run[j] = moving;
  }
}

// order = the indices 0..cols-1 sorted by key, stably (equal keys keep index order). Where the
// bits in which keys differ (`varying`) span at most kMaxDigitBits, one counting pass on them.
// Else an LSD radix sort by the two highest bytes in which keys differ, then, in the runs of keys
// equal in those and the bytes above, by the lower bytes that vary. The float32 |tau| of bf16 tunes
// differ in 9 bits (one pass where bytes took two) or in three bytes, the lowest set in a few
// elements in 200 (two passes and a scan where there were three).
void stable_order(const uint32_t* keys, int64_t cols, uint32_t varying, uint32_t* order, uint32_t* spare) {
  for (int64_t j = 0; j < cols; ++j) order[j] = uint32_t(j);
  if (varying == 0) return;
  const int low = __builtin_ctz(varying), span = 32 - __builtin_clz(varying) - low;
  if (span <= kMaxDigitBits) {  // the narrowest digit that holds them (its bits above them: alike in every key)
    if (span <= 8) counting_pass<8>(keys, cols, std::min(low, 24), order, spare);
    else if (span == 9) counting_pass<9>(keys, cols, std::min(low, 23), order, spare);
    else counting_pass<kMaxDigitBits>(keys, cols, std::min(low, 32 - kMaxDigitBits), order, spare);
    std::memcpy(order, spare, size_t(cols) * sizeof(uint32_t));
    return;
  }
  int shifts[4], bytes = 0;  // the varying bytes, highest first
  for (int shift = 24; shift >= 0; shift -= 8)
    if ((varying >> shift) & 255u) shifts[bytes++] = shift;
  const int whole = std::min(bytes, 2);
  byte_passes(keys, order, cols, shifts, whole, spare);
  if (bytes <= whole) return;
  const uint32_t above = ~((uint32_t(1) << shifts[whole - 1]) - 1);  // the bytes sorted so far, and higher
  for (int64_t i = 0; i < cols;) {
    const uint32_t head = keys[order[i]];
    bool mixed = false;
    int64_t j = i + 1;
    for (; j < cols && ((keys[order[j]] ^ head) & above) == 0; ++j) mixed |= keys[order[j]] != head;
    if (mixed) sort_run(keys, order + i, j - i, shifts + whole, bytes - whole, spare);
    i = j;
  }
}

// The keep threshold of each rank along a row, floor(p·2^24): the same for every row of a model.
std::vector<float> rank_thresholds(int64_t cols, float low, float spread) {
  std::vector<float> thresholds(static_cast<size_t>(cols));
  const float last = float(cols - 1);
  for (int64_t rank = 0; rank < cols; ++rank) {
    const float rank_norm = cols > 1 ? float(rank) / last : 0.f;
    const float p = low + rank_norm * spread;
    thresholds[size_t(rank)] = std::floor(p * 16777216.f);
  }
  return thresholds;
}

// The 24-bit draws of flat elements j0 .. j0+cols-1, as floats (exact): a loop over consecutive
// elements the compiler vectorises, where hashing in rank order could not be.
void row_draws(int64_t j0, int64_t cols, uint32_t s1, uint32_t s2, float* draws) {
  for (int64_t c = 0; c < cols; ++c) {
    const uint64_t j = uint64_t(j0 + c);
    const uint32_t inner = uint32_t(mix32<ScalarLane>(static_cast<int32_t>(uint32_t(j >> 32) ^ s2)));
    const uint32_t h = uint32_t(mix32<ScalarLane>(static_cast<int32_t>(uint32_t(j) ^ s1 ^ inner)));
    draws[c] = float(h >> 8);
  }
}

template <class T>
void della_rows(const TaskSource& s, const DellaArgs& a, int model, int64_t r0, int64_t r1, uint8_t* masks) {
  const int64_t cols = a.cols;
  std::vector<uint32_t> keys(static_cast<size_t>(cols)), order(keys.size()), spare(keys.size());
  std::vector<float> draws(keys.size());
  const std::vector<float> thresholds = rank_thresholds(cols, a.low[size_t(model)], a.spread[size_t(model)]);
  const uint32_t s1 = a.s1[size_t(model)], s2 = a.s2[size_t(model)];
  uint8_t* out = masks + int64_t(model) * a.rows * cols;
  for (int64_t row = r0; row < r1; ++row) {
    const uint32_t varying = row_keys<T>(s, model, row, cols, keys.data());
    stable_order(keys.data(), cols, varying, order.data(), spare.data());
    row_draws(row * cols, cols, s1, s2, draws.data());
    uint8_t* o = out + row * cols;
    for (int64_t rank = 0; rank < cols; ++rank) {
      const uint32_t c = order[size_t(rank)];
      o[c] = draws[c] < thresholds[size_t(rank)] ? 1 : 0;
    }
  }
}

}  // namespace

void della_masks(const TaskSource& s, const DellaArgs& a, uint8_t* masks, int threads) {
  const int n = static_cast<int>(s.xs.size());
  const int64_t blocks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_tasks(int64_t(n) * blocks, plan_threads(int64_t(n) * a.rows * a.cols, threads), [&](int64_t t) {
    const int model = static_cast<int>(t / blocks);
    const int64_t r0 = (t % blocks) * kRowsPerTask, r1 = std::min(a.rows, r0 + kRowsPerTask);
    switch (s.dtype) {
      case kFloat16: return della_rows<f16>(s, a, model, r0, r1, masks);
      case kBFloat16: return della_rows<bf16>(s, a, model, r0, r1, masks);
      default: return della_rows<float>(s, a, model, r0, r1, masks);
    }
  });
}

}  // namespace fk
