// The k-th largest |x - base| over all the tensors of a model, per model, without concatenating
// them. Fast path (one pass): a strided sample of every model's keys brackets its k-th largest;
// one sweep over every tensor (the base read once per element, for all models) counts the keys
// above each bracket and collects the few inside it; a selection among those gives the key.
// Fallback (a bracket missed): radix select on the float32 magnitude bits with two 16-bit digits,
// two more sweeps. Semantics: fusion_kernels/reference/magnitude_prune.py (global_magnitude_threshold).
#include "global_threshold.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "lanes.h"
#include "runtime.h"
#include "kernels.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int kDigits = 1 << 16;
constexpr int64_t kBlock = 4096;  // elements per model and step of a sweep

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
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {  // the base's block stays in cache for every model
        const int64_t b1 = std::min(end, b0 + kBlock);
        for (int m = 0; m < m_count; ++m) {
          const T* x = static_cast<const T*>(xs[m]);
          uint32_t* hm = h + size_t(m) * kDigits;
          for (int64_t j = b0; j < b1; ++j) {
            const int digit = digit_of(m, key_of(x, base, j));
            if (digit >= 0) ++hm[digit];
          }
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
std::vector<uint32_t> radix_keys(const GlobalThresholdArgs& a, int threads) {
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

constexpr int64_t kSample = int64_t(1) << 18;
// Per model, keys [lo, hi] holding its k-th largest with overwhelming probability: from a fixed
// strided sample of its keys, the sample's ranks around k·S/N ± 4 binomial deviations + slack.
template <class T>
void choose_brackets(const GlobalThresholdArgs& a, int64_t total, std::vector<uint32_t>& lo, std::vector<uint32_t>& hi) {
  const int64_t samples = std::min(total, kSample);
  std::vector<int64_t> starts(a.numels.size() + 1, 0);
  for (size_t t = 0; t < a.numels.size(); ++t) starts[t + 1] = starts[t] + a.numels[t];
  std::vector<uint32_t> keys(samples);
  for (int m = 0; m < a.models; ++m) {
    size_t tensor = 0;
    for (int64_t i = 0; i < samples; ++i) {
      const int64_t at = i * total / samples;
      while (starts[tensor + 1] <= at) ++tensor;
      const T* base = static_cast<const T*>(a.bases.empty() ? nullptr : a.bases[tensor]);
      keys[i] = key_of(static_cast<const T*>(a.xs[tensor * a.models + m]), base, at - starts[tensor]);
    }
    const double r = double(a.ks[m]) / double(total), pos = r * double(samples);
    const double spread = 4.0 * std::sqrt(double(samples) * r * (1.0 - r)) + 16.0;
    const int64_t top = std::max<int64_t>(0, int64_t(pos - spread));
    const int64_t bottom = std::min<int64_t>(samples - 1, int64_t(pos + spread));
    const auto desc = [](uint32_t x, uint32_t y) { return x > y; };
    std::nth_element(keys.begin(), keys.begin() + bottom, keys.end(), desc);
    lo[m] = bottom >= samples - 1 ? 0u : keys[bottom];
    std::nth_element(keys.begin(), keys.begin() + top, keys.begin() + bottom, desc);
    hi[m] = top == 0 ? 0xffffffffu : keys[top];
  }
}

// The fast path: per model, count the keys above hi and collect those in [lo, hi]; the k-th
// largest is among the collected when above < k <= above + collected. Returns false otherwise.
template <class T>
bool bracket_keys(const GlobalThresholdArgs& a, int64_t total, int dtype, int threads, std::vector<uint32_t>& out) {
  const int m_count = a.models;
  std::vector<uint32_t> lo(m_count), hi(m_count);
  choose_brackets<T>(a, total, lo, hi);
  const int t = std::max(1, threads);
  // Room per thread and model for about 4x the candidates a bracket is expected to hold; past it
  // (a skewed model, or one too large to collect for) the radix passes take over.
  const double expected = 2.0 * (4.0 * std::sqrt(double(kSample) / 4.0) + 16.0) / double(kSample);
  const int64_t cap = std::min<int64_t>(int64_t(1) << 24, int64_t(4.0 * expected * double(total) / t) + 4096);
  std::vector<int64_t> above(size_t(t) * m_count, 0), found(size_t(t) * m_count, 0);
  std::vector<std::unique_ptr<uint32_t[]>> buffers;  // uninitialised: pages are touched as keys arrive
  for (size_t slot = 0; slot < size_t(t) * m_count; ++slot) buffers.emplace_back(new uint32_t[size_t(cap)]);
  std::vector<char> overflow(size_t(t), 0);
  const ThresholdScanFn scan = active_kernels().threshold_scan[dtype];
  for (size_t tensor = 0; tensor < a.numels.size(); ++tensor) {
    const int64_t n = a.numels[tensor];
    const void* base = a.bases.empty() ? nullptr : a.bases[tensor];
    const void* const* xs = a.xs.data() + tensor * m_count;
    parallel_pieces(n, plan_threads(n * m_count, t), [&](int tid, int64_t begin, int64_t end) {
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {  // the base's block stays in cache for every model
        const int64_t b1 = std::min(end, b0 + kBlock);
        for (int m = 0; m < m_count && !overflow[tid]; ++m) {
          const size_t slot = size_t(tid) * m_count + m;
          ThresholdScanArgs s;
          s.x = xs[m];
          s.base = base;
          s.lo = int32_t(lo[m]);
          s.hi = int32_t(std::min<uint32_t>(hi[m], 0x7fffffffu));
          s.buffer = buffers[slot].get();
          s.found = &found[slot];
          s.cap = cap;
          const int64_t count = scan(s, b0, b1);
          if (count < 0) overflow[tid] = 1;
          else above[slot] += count;
        }
      }
    });
  }
  for (char o : overflow)
    if (o) return false;
  for (int m = 0; m < m_count; ++m) {
    int64_t over = 0;
    std::vector<uint32_t> keys;
    for (int tid = 0; tid < t; ++tid) {
      const size_t slot = size_t(tid) * m_count + m;
      over += above[slot];
      keys.insert(keys.end(), buffers[slot].get(), buffers[slot].get() + found[slot]);
    }
    const int64_t need = a.ks[m] - over;  // the need-th largest of the collected keys
    if (need < 1 || need > int64_t(keys.size())) return false;
    std::nth_element(keys.begin(), keys.begin() + (need - 1), keys.end(), [](uint32_t x, uint32_t y) { return x > y; });
    out[m] = keys[need - 1];
  }
  return true;
}

template <class T>
std::vector<uint32_t> select_keys(const GlobalThresholdArgs& a, int64_t total, int dtype, int threads) {
  std::vector<uint32_t> keys(a.models);
  if (bracket_keys<T>(a, total, dtype, threads, keys)) return keys;
  return radix_keys<T>(a, threads);
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
  with_storage(dtype, [&](auto tag) { keys = select_keys<decltype(tag)>(a, total, dtype, threads); });
  return keys;
}

}  // namespace fk
