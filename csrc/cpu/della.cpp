// Per model and row: rank |tau| along the row, ascending with ties by index; the element of rank r
// is kept with probability p = (density - eps) + 2·eps·r/(cols - 1), drawn from the DARE hash at its
// flat index: keep = draw24 < floor(p·2^24), every step rounded as the reference does. A draw below
// the first rank's threshold is kept and one at or above the last rank's dropped whatever its rank;
// only those between (a 2·eps share) need their rank. The ranks are the positions of a stable radix
// sort of the float32 bit patterns over the bits in which they differ: one counting pass where those
// bits fit one digit (decide_by_digit); else one on a coarse digit (equal slices of the nonzero
// keys' range), which decides nearly all of the band's draws, and a vector pass over the row ranks
// the few others (decide_by_coarse_digit), or, where the digits crowd, an order array (stable_order).
#include "della.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "della_kernels.h"
#include "kernels.h"
#include "lanes.h"
#include "runtime.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int64_t kRowsPerTask = 16;

constexpr int kMaxDigitBits = 10;  // the single pass's digit: 2^10 buckets (4 parts' counters: 16 KB)
constexpr int kParts = 4;

// Calls f(q, k) for every item k in 0..count-1, k in part q: four consecutive parts (lengths
// differing by at most one) visited side by side, so that the counting passes' four chains of
// increments run independently where one would stall on the few buckets of an exponent.
template <class F>
void each_in_parts(int64_t count, F&& f) {
  int64_t begin[kParts + 1];
  for (int q = 0; q <= kParts; ++q) begin[q] = q * count / kParts;
  const int64_t shortest = count / kParts, longest = (count + kParts - 1) / kParts;
  for (int64_t k = 0; k < shortest; ++k)
    for (int q = 0; q < kParts; ++q) f(q, begin[q] + k);
  for (int64_t k = shortest; k < longest; ++k)
    for (int q = 0; q < kParts; ++q)
      if (begin[q] + k < begin[q + 1]) f(q, begin[q] + k);
}

// Buckets [first, last] of a counting pass: those its digits can take (the rest need no counters).
struct Buckets {
  uint32_t first, last;
};

// Zeroes the counters at[q][v] of the buckets `used`, calls count(q, k) for every item (which adds
// item k of part q to its digit's counter), then turns each counter into the number of items before
// its (digit, part) in a stable order by digit: digits ascending, a digit's parts in order.
template <int kBits, class Count>
void count_then_offsets(int64_t count, Buckets used, uint32_t (*at)[1 << kBits], Count count_item) {
  for (int q = 0; q < kParts; ++q) std::fill(at[q] + used.first, at[q] + used.last + 1, 0u);
  each_in_parts(count, count_item);
  uint32_t sum = 0;
  for (uint32_t v = used.first; v <= used.last; ++v)
    for (int q = 0; q < kParts; ++q) sum += std::exchange(at[q][v], sum);
}

// One stable counting pass on the kBits-bit digit_of(k) of items 0..count-1 (a compile-time width:
// the byte passes run a third faster than with a run-time one): place(k, position) for every item,
// equal digits in item order.
template <int kBits, class Digit, class Place>
void counting_pass(int64_t count, Digit digit_of, Place place) {
  constexpr uint32_t kMask = (1u << kBits) - 1;
  uint32_t at[kParts][1 << kBits];
  count_then_offsets<kBits>(count, Buckets{0, kMask}, at, [&](int q, int64_t k) { ++at[q][digit_of(k) & kMask]; });
  each_in_parts(count, [&](int q, int64_t k) { place(k, at[q][digit_of(k) & kMask]++); });
}

// Orders the indices run[0, length) by the bytes of their keys at `shifts` (highest first), stably:
// an LSD counting pass per byte, lowest first.
void byte_passes(const uint32_t* keys, uint32_t* run, int64_t length, const int* shifts, int bytes, uint32_t* spare) {
  uint32_t *src = run, *dst = spare;
  for (int b = bytes - 1; b >= 0; --b) {
    const int shift = shifts[b];
    counting_pass<8>(
        length, [keys, src, shift](int64_t k) { return keys[src[k]] >> shift; },
        [src, dst](int64_t k, uint32_t at) { dst[at] = src[k]; });
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

// order = the indices 0..cols-1 sorted by key, stably (equal keys keep index order), for keys that
// differ in more bits than one counting pass takes: an LSD radix sort by the two highest bytes in
// which keys differ, then, in the runs of keys equal in those and the bytes above, by the lower
// bytes that vary (the float32 |tau| of bf16 tunes that differ in three bytes set the lowest in a
// few elements in 200: two passes and a scan where there were three).
void stable_order(const uint32_t* keys, int64_t cols, uint32_t varying, uint32_t* order, uint32_t* spare) {
  for (int64_t j = 0; j < cols; ++j) order[j] = uint32_t(j);
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

// The keep threshold of each rank along a row, floor(p·2^24) as the reference rounds it, clamped to
// [0, 2^24] (a 24-bit draw is below 0 never, below 2^24 always; NaN: never): the same for every row,
// and the same steps as the decide kernel takes for the ranks it does not look up (della_threshold).
std::vector<uint32_t> rank_thresholds(int64_t cols, const DellaRankScale& scale) {
  std::vector<uint32_t> thresholds(static_cast<size_t>(cols));
  for (int64_t rank = 0; rank < cols; ++rank)
    thresholds[size_t(rank)] = uint32_t(della_threshold<ScalarLane>(int32_t(rank), scale));
  return thresholds;
}

// Calls draw_span(first, n, key, c) for the row's elements j0 + c .. j0 + c + n - 1 of each 2^32
// span of flat indices, key the span's hash key (its inner hash formed once).
template <class F>
void row_spans(int64_t j0, int64_t cols, uint32_t s1, uint32_t s2, F&& draw_span) {
  for (int64_t c = 0; c < cols;) {
    const uint64_t high = uint64_t(j0 + c) >> 32;
    const int64_t end = std::min<int64_t>(cols, int64_t((high + 1) << 32) - j0);
    const uint32_t key = s1 ^ uint32_t(mix32<ScalarLane>(static_cast<int32_t>(uint32_t(high) ^ s2)));
    draw_span(uint32_t(j0 + c), end - c, key, c);
    c = end;
  }
}

// o[c] = draws[c] < thresholds[rank of c] for the listed c (mid[0, count), ascending), the keys'
// varying bits (the lowest at `low`) fitting the narrowest kBits-bit digit that holds them (keys in
// range[0] .. range[1]): one counting pass records each element's place among the equal digits of
// its part (pos), then rank = the offset of (digit, part) + pos.
template <int kBits>
void decide_by_digit(const uint32_t* keys, int64_t cols, int low, const uint32_t* range, const uint32_t* mid,
                     int64_t count, const uint32_t* draws, const uint32_t* thresholds, uint32_t* pos, uint8_t* o) {
  if (count == 0) return;  // epsilon 0, say: every draw decided
  constexpr uint32_t kMask = (1u << kBits) - 1;
  const int shift = std::min(low, 32 - kBits);
  const auto digit_of = [keys, shift](int64_t k) { return (keys[k] >> shift) & kMask; };
  const Buckets used{(range[0] >> shift) & kMask, (range[1] >> shift) & kMask};  // the bits above: alike
  uint32_t at[kParts][1 << kBits];
  count_then_offsets<kBits>(cols, used, at, [&at, pos, digit_of](int q, int64_t k) { pos[k] = at[q][digit_of(k)]++; });
  int64_t i = 0;
  for (int q = 0; q < kParts; ++q) {  // each_in_parts' parts
    const uint32_t* offset = at[q];
    for (const int64_t end = (q + 1) * cols / kParts; i < count && mid[i] < end; ++i) {
      const uint32_t c = mid[i];
      o[c] = draws[c] < thresholds[offset[digit_of(c)] + pos[c]] ? 1 : 0;
    }
  }
}

// decide_by_digit for keys whose varying bits exceed one digit: the counting pass on a coarse digit,
// 1 + (key - the least nonzero key) >> shift in 2^kMaxDigitBits values, 0 for the zeros (monotone in
// the key; equal-width slices of the nonzero keys' range, each a fraction of a binade: the zeros of
// unchanged weights would stretch a range from 0 over a hundred empty binades), gives each element
// the range of ranks [start, end) of its digit's keys. A listed draw below the threshold of the
// range's first rank is kept and one at or above its last rank's dropped (the ISA's della_decide);
// a draw between (a few in a row) takes its exact rank from one vector pass over the row (della_rank).
// Returns false, with some of o written, past kMaxExactRanks of those (the keys of a row of outliers
// crowd a few digits): the caller ranks the whole row. digits: room for cols.
constexpr int64_t kMaxExactRanks = 32;
bool decide_by_coarse_digit(const uint32_t* keys, int64_t cols, const uint32_t* range, const uint32_t* mid,
                            int64_t count, const uint32_t* draws, const uint32_t* thresholds, DellaRankScale scale,
                            uint32_t* digits, const KernelTable& kernels, uint8_t* o) {
  if (count == 0) return true;
  constexpr int kBits = kMaxDigitBits;
  const uint32_t least = range[2], spread = range[1] - least;  // the least nonzero key: > 0, the keys differ
  const int shift = spread ? std::max(0, 32 - __builtin_clz(spread) - kBits) : 0;
  const uint32_t last = (spread >> shift) + 1;
  // begin[v]: the number of keys of a digit below v (one chain of increments: the keys spread over
  // hundreds of digits, where the single-digit passes' four parts pay for their sums)
  uint32_t begin[(1 << kBits) + 2];
  std::fill(begin, begin + last + 2, 0u);
  for (int64_t k = 0; k < cols; ++k) digits[k] = keys[k] ? ((keys[k] - least) >> shift) + 1 : 0u;  // vectorised
  for (int64_t k = 0; k < cols; ++k) ++begin[digits[k] + 1];
  for (uint32_t v = 1; v <= last + 1; ++v) begin[v] += begin[v - 1];
  uint32_t exact[kMaxExactRanks];
  const int64_t n_exact = kernels.della_decide(mid, count, digits, begin, draws, scale, o, exact, kMaxExactRanks);
  for (int64_t i = 0; i < n_exact; ++i) {
    const uint32_t c = exact[i];
    o[c] = draws[c] < thresholds[kernels.della_rank(keys, cols, c)] ? 1 : 0;
  }
  return n_exact >= 0;
}

// Keep masks of rows [r0, r1) of one model; thr: its rank_thresholds for scale.
void della_rows(const TaskSource& s, const DellaArgs& a, int model, const DellaRankScale& scale, const uint32_t* thr,
                int64_t r0, int64_t r1, uint8_t* masks) {
  const int64_t cols = a.cols;
  const KernelTable& kernels = active_kernels();
  const DellaKeysFn row_keys = kernels.della_keys[s.dtype];
  const size_t bytes = s.dtype == kFloat32 ? 4 : 2;
  const char* x = static_cast<const char*>(s.xs[size_t(model)]);
  const char* base = static_cast<const char*>(s.base);
  const size_t n = static_cast<size_t>(cols);
  std::vector<uint32_t> keys(n), draws(n), mid(n + kMaxLaneWidth), pos(n), order, spare;  // mid: compress_store's room
  const uint32_t s1 = a.s1[size_t(model)], s2 = a.s2[size_t(model)];
  const uint32_t lo = thr[0], hi = thr[cols - 1];  // rank_thresholds ascend
  uint8_t* out = masks + int64_t(model) * a.rows * cols;
  for (int64_t row = r0; row < r1; ++row) {
    const size_t at = size_t(row * cols) * bytes;
    uint32_t range[3];
    const uint32_t varying = row_keys(x + at, base ? base + at : nullptr, cols, keys.data(), range);
    uint8_t* o = out + row * cols;
    const int low = varying ? __builtin_ctz(varying) : 0;
    const int span = varying ? 32 - __builtin_clz(varying) - low : 0;
    // the draws the first and last rank decide written, the others listed in mid
    int64_t count = 0;
    row_spans(row * cols, cols, s1, s2, [&](uint32_t first, int64_t n, uint32_t key, int64_t c) {
      count += kernels.della_draws(first, n, key, lo, hi, uint32_t(c), draws.data() + c, o + c, mid.data() + count);
    });
    if (span > kMaxDigitBits) {
      if (!decide_by_coarse_digit(keys.data(), cols, range, mid.data(), count, draws.data(), thr, scale, pos.data(),
                                  kernels, o)) {
        // an order array: every element decided in rank order
        order.resize(n);
        spare.resize(n);
        stable_order(keys.data(), cols, varying, order.data(), spare.data());
        for (int64_t r = 0; r < cols; ++r) {
          const uint32_t c = order[size_t(r)];
          o[c] = draws[c] < thr[r] ? 1 : 0;
        }
      }
    } else {
      if (span <= 8)  // all keys equal too: one bucket, ranks in index order
        decide_by_digit<8>(keys.data(), cols, low, range, mid.data(), count, draws.data(), thr, pos.data(), o);
      else if (span == 9)  // a narrower digit: fewer counters to clear
        decide_by_digit<9>(keys.data(), cols, low, range, mid.data(), count, draws.data(), thr, pos.data(), o);
      else
        decide_by_digit<kMaxDigitBits>(keys.data(), cols, low, range, mid.data(), count, draws.data(), thr, pos.data(), o);
    }
    if (a.l1) kernels.della_l1(keys.data(), o, cols, a.l1 + 2 * (int64_t(model) * a.rows + row));
  }
}

}  // namespace

void della_masks(const TaskSource& s, const DellaArgs& a, uint8_t* masks, int threads) {
  const int n = static_cast<int>(s.xs.size());
  if (a.rows == 0 || a.cols == 0) return;
  std::vector<DellaRankScale> scales;
  std::vector<std::vector<uint32_t>> thresholds;
  for (int i = 0; i < n; ++i) {
    scales.push_back({a.low[size_t(i)], a.spread[size_t(i)], a.cols > 1 ? float(a.cols - 1) : 1.f});
    thresholds.push_back(rank_thresholds(a.cols, scales.back()));
  }
  const int64_t blocks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_tasks(int64_t(n) * blocks, plan_threads(int64_t(n) * a.rows * a.cols, threads), [&](int64_t t) {
    const int model = static_cast<int>(t / blocks);
    const int64_t r0 = (t % blocks) * kRowsPerTask, r1 = std::min(a.rows, r0 + kRowsPerTask);
    della_rows(s, a, model, scales[size_t(model)], thresholds[size_t(model)].data(), r0, r1, masks);
  });
}

}  // namespace fk
