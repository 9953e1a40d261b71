// The k-th largest |x - base| over all the tensors of a model, per model, without concatenating
// them: radix select on the float32 magnitude bits with two 16-bit digits. Each pass sweeps every
// tensor once for all models (the base is read once per element); the second pass only counts
// the keys whose high digit is the one the first pass found. Semantics:
// fusion_kernels/reference/magnitude_prune.py (global_magnitude_threshold).
#include "global_threshold.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "lanes.h"
#include "runtime.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int kDigits = 1 << 16;

template <class T>
uint32_t key_of(const T* x, const T* base, int64_t j) {
  const float v = ScalarLane::load(x + j) - (base ? ScalarLane::load(base + j) : 0.f);
  return float_to_bits(v) & 0x7fffffffu;
}

// Adds to totals[m][digit] the keys of every tensor (of model m) that `digit_of` maps to a digit
// (>= 0), counting per thread in uint32 and flushing before any count could overflow.
template <class T, class DigitOf>
void histogram(const GlobalThresholdArgs& a, std::vector<int64_t>& totals, int threads, DigitOf digit_of) {
  const int m_count = a.models;
  const int t = std::max(1, threads);
  std::vector<uint32_t> counts(size_t(t) * m_count * kDigits, 0);
  int64_t since_flush = 0;
  const auto flush = [&] {
    for (int tid = 0; tid < t; ++tid)
      for (size_t i = 0; i < size_t(m_count) * kDigits; ++i) {
        uint32_t& c = counts[size_t(tid) * m_count * kDigits + i];
        totals[i] += c;
        c = 0;
      }
    since_flush = 0;
  };
  for (size_t tensor = 0; tensor < a.numels.size(); ++tensor) {
    const int64_t n = a.numels[tensor];
    if (since_flush + n > (int64_t(1) << 31)) flush();
    since_flush += n;
    const T* base = static_cast<const T*>(a.bases.empty() ? nullptr : a.bases[tensor]);
    const void* const* xs = a.xs.data() + tensor * m_count;
    parallel_pieces(n, plan_threads(n * m_count, t), [&](int tid, int64_t begin, int64_t end) {
      uint32_t* h = counts.data() + size_t(tid) * m_count * kDigits;
      for (int m = 0; m < m_count; ++m) {
        const T* x = static_cast<const T*>(xs[m]);
        uint32_t* hm = h + size_t(m) * kDigits;
        for (int64_t j = begin; j < end; ++j) {
          const int digit = digit_of(m, key_of(x, base, j));
          if (digit >= 0) ++hm[digit];
        }
      }
    });
  }
  flush();
}

// The digit holding the `rank`-th largest key (1-based) of one histogram, and the rank left inside it.
int pick(const int64_t* hist, int64_t& rank) {
  for (int d = kDigits - 1; d > 0; --d) {
    if (rank <= hist[d]) return d;
    rank -= hist[d];
  }
  return 0;
}

template <class T>
std::vector<uint32_t> select_keys(const GlobalThresholdArgs& a, int threads) {
  const int m_count = a.models;
  std::vector<int64_t> high(size_t(m_count) * kDigits, 0), low(size_t(m_count) * kDigits, 0);
  histogram<T>(a, high, threads, [](int, uint32_t key) { return int(key >> 16); });
  std::vector<int64_t> rank(a.ks.begin(), a.ks.end());
  std::vector<uint32_t> prefix(m_count);
  for (int m = 0; m < m_count; ++m) prefix[m] = uint32_t(pick(high.data() + size_t(m) * kDigits, rank[m]));
  histogram<T>(a, low, threads, [&prefix](int m, uint32_t key) {
    return (key >> 16) == prefix[m] ? int(key & 0xffffu) : -1;
  });
  std::vector<uint32_t> keys(m_count);
  for (int m = 0; m < m_count; ++m) keys[m] = (prefix[m] << 16) | uint32_t(pick(low.data() + size_t(m) * kDigits, rank[m]));
  return keys;
}

}  // namespace

std::vector<uint32_t> global_threshold(const GlobalThresholdArgs& a, int dtype, int threads) {
  if (a.models < 1 || a.ks.size() != size_t(a.models)) throw std::invalid_argument("global_threshold: one k per model");
  if (a.xs.size() != a.numels.size() * size_t(a.models))
    throw std::invalid_argument("global_threshold: one input per tensor and model");
  if (!a.bases.empty() && a.bases.size() != a.numels.size())
    throw std::invalid_argument("global_threshold: one base per tensor, or none");
  int64_t total = 0;
  for (int64_t n : a.numels) total += n;
  for (int64_t k : a.ks)
    if (k < 1 || k > total) throw std::invalid_argument("global_threshold: k must be in [1, total elements]");
  std::vector<uint32_t> keys;
  with_storage(dtype, [&](auto tag) { keys = select_keys<decltype(tag)>(a, threads); });
  return keys;
}

}  // namespace fk
