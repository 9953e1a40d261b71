// Exact top-k by magnitude without sorting the data.
// Fast path (one pass): a fixed strided sample brackets the k-th largest key; one pass counts the
// keys above the bracket and collects the few inside it; an exact nth_element on those gives the
// threshold, and their index order gives the tie cut-off.
// Fallback (bracket missed, or too many candidates, e.g. a tensor of mostly equal values): radix
// select over the key bits with 16-bit digits (one histogram pass for 16-bit keys, two for
// float32), then, only when the threshold value occurs more often than needed, a count pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "runtime.h"
#include "sparse.h"

namespace fk {
namespace {

constexpr int kBins = 1 << 16;

struct Query {
  int model = 0;
  int64_t k = 0;
  uint32_t prefix = 0;  // digits fixed so far
  int64_t above = 0;    // elements with a larger key than any matching the prefix
  TopK result;
  bool done = false;
};

// Counts digit `shift` of the keys of each pending query's model whose higher digits match the
// query's prefix, then fixes that digit: the one holding the (k - above)-th largest key.
void refine(const TaskSource& s, std::vector<Query>& qs, int shift, bool last, int threads) {
  const int64_t n = s.numel;
  const int t = plan_threads(n, threads);
  const size_t nq = qs.size();
  std::vector<uint32_t> hist(size_t(t) * nq * kBins, 0);
  with_typed(s, [&](const auto& v) {
    parallel_pieces(n, t, [&](int tid, int64_t begin, int64_t end) {
      uint32_t* h = hist.data() + size_t(tid) * nq * kBins;
      for (int64_t j = begin; j < end; ++j) {
        for (size_t q = 0; q < nq; ++q) {
          if (qs[q].done) continue;
          const int m = qs[q].model;
          const uint32_t key = v.key(m, j, v.value(m, j));
          const uint32_t high = shift + 16 >= 32 ? 0 : key >> (shift + 16);
          if (high == qs[q].prefix) ++h[q * kBins + ((key >> shift) & 0xffffu)];
        }
      }
    });
  });
  for (size_t q = 0; q < nq; ++q) {
    Query& qu = qs[q];
    if (qu.done) continue;
    std::vector<int64_t> count(kBins, 0);
    for (int tid = 0; tid < t; ++tid)
      for (int b = 0; b < kBins; ++b) count[b] += hist[(size_t(tid) * nq + q) * kBins + b];
    int64_t above = qu.above;
    int digit = kBins - 1;
    for (; digit > 0 && above + count[digit] < qu.k; --digit) above += count[digit];
    qu.prefix = (qu.prefix << 16) | uint32_t(digit);
    qu.above = above;
    if (last) {
      qu.result.t = qu.prefix;
      // Every key equal to t is kept when all of them fit; otherwise cut() places the cut-off.
      qu.result.cut = (above + count[digit] == qu.k) ? n : -1;
    }
  }
}

// For queries whose threshold value is shared by more elements than fit: the index just past the
// (k - above)-th element equal to the threshold.
void cut(const TaskSource& s, std::vector<Query>& qs, int threads) {
  const int64_t n = s.numel;
  for (Query& qu : qs) {
    if (qu.done || qu.result.cut >= 0) continue;
    const int t = plan_threads(n, threads);
    const int64_t per = ((n + t - 1) / t + 63) / 64 * 64;
    std::vector<int64_t> equal(t, 0);
    with_typed(s, [&](const auto& v) {
      const auto matches = [&](int64_t j) { return v.key(qu.model, j, v.value(qu.model, j)) == uint32_t(qu.result.t); };
      parallel_pieces(n, t, [&](int tid, int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) equal[tid] += matches(j);
      });
      int64_t need = qu.k - qu.above;
      int piece = 0;
      while (need > equal[piece]) need -= equal[piece++];
      for (int64_t j = std::min(n, piece * per);; ++j) {
        if (matches(j) && --need == 0) {
          qu.result.cut = j + 1;
          break;
        }
      }
    });
  }
}

constexpr int64_t kSample = int64_t(1) << 18;
constexpr int kIndexBits = 33;  // candidates pack (key, index) into 64 bits: tensors below 2^33 elements
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;

// Larger packed value = ranks first: larger key, then lower index (the tie rule).
inline uint64_t pack(uint32_t key, int64_t j) { return (uint64_t(key) << kIndexBits) | (kIndexMask - uint64_t(j)); }

struct Bracket {
  uint32_t lo = 0, hi = 0;  // candidates: lo <= key <= hi; "above": key > hi
  int64_t above = 0;
  std::vector<uint64_t> candidates;  // packed (key, index)
  bool usable = false;
};

// Sample keys at fixed strided positions and pick a bracket around the k-th largest that holds it
// with overwhelming probability (± 4 binomial standard deviations + slack).
template <class V>
void choose_bracket(const V& v, const Query& q, int64_t n, Bracket& b) {
  const int64_t samples = std::min(n, kSample);
  std::vector<uint32_t> keys(samples);
  for (int64_t i = 0; i < samples; ++i) {
    const int64_t j = i * n / samples;
    keys[i] = v.key(q.model, j, v.value(q.model, j));
  }
  const double r = double(q.k) / double(n);
  const double pos = r * double(samples);
  const double spread = 4.0 * std::sqrt(double(samples) * r * (1.0 - r)) + 16.0;
  const int64_t top = std::max<int64_t>(0, int64_t(pos - spread));
  const int64_t bottom = std::min<int64_t>(samples - 1, int64_t(pos + spread));
  const auto desc = [](uint32_t a, uint32_t c) { return a > c; };
  std::nth_element(keys.begin(), keys.begin() + bottom, keys.end(), desc);
  b.lo = bottom >= samples - 1 ? 0u : keys[bottom];
  std::nth_element(keys.begin(), keys.begin() + top, keys.begin() + bottom, desc);
  b.hi = top == 0 ? 0xffffffffu : keys[top];
}

// One pass for all queries: count keys above each bracket and collect the keys inside it.
template <class V>
void bracket_pass(const V& v, const std::vector<Query>& qs, std::vector<Bracket>& bs, int64_t n, int threads) {
  const int t = plan_threads(n, threads);
  const size_t nq = qs.size();
  const int64_t cap = std::max<int64_t>(int64_t(1) << 20, n / 32) / t;  // per thread and query
  std::vector<std::vector<uint64_t>> found(size_t(t) * nq);
  std::vector<int64_t> above(size_t(t) * nq, 0);
  std::vector<uint8_t> overflow(size_t(t) * nq, 0);
  parallel_pieces(n, t, [&](int tid, int64_t begin, int64_t end) {
    uint32_t keys[kBlock];
    float b[kBlock], tau[kBlock];
    for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
      const int m = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
      base_block(v, j0, m, b);
      for (size_t q = 0; q < nq; ++q) {
        const size_t slot = size_t(tid) * nq + q;
        if (qs[q].done || !bs[q].usable || overflow[slot]) continue;
        task_block(v, qs[q].model, j0, m, b, tau, keys);
        const uint32_t lo = bs[q].lo, hi = bs[q].hi;
        int64_t count = 0;
        for (int j = 0; j < m; ++j) count += keys[j] > hi;
        above[slot] += count;
        auto& mine = found[slot];
        for (int j = 0; j < m; ++j) {
          if (keys[j] >= lo && keys[j] <= hi) mine.push_back(pack(keys[j], j0 + j));
        }
        if (int64_t(mine.size()) > cap) {
          overflow[slot] = 1;
          std::vector<uint64_t>().swap(mine);
        }
      }
    }
  });
  for (size_t q = 0; q < nq; ++q) {
    if (qs[q].done || !bs[q].usable) continue;
    Bracket& b = bs[q];
    size_t total = 0;
    for (int tid = 0; tid < t; ++tid) total += found[size_t(tid) * nq + q].size();
    b.candidates.reserve(total);
    for (int tid = 0; tid < t; ++tid) {
      auto& mine = found[size_t(tid) * nq + q];
      b.usable = b.usable && !overflow[size_t(tid) * nq + q];
      b.above += above[size_t(tid) * nq + q];
      b.candidates.insert(b.candidates.end(), mine.begin(), mine.end());
      std::vector<uint64_t>().swap(mine);
    }
    const int64_t k = qs[q].k;
    b.usable = b.usable && b.above < k && k <= b.above + int64_t(b.candidates.size());
  }
}

// The exact TopK from a usable bracket: the (k - above)-th largest packed candidate is the last
// element kept, so it gives both the threshold key and the index cut-off.
TopK finish_bracket(Bracket& b, int64_t k) {
  const int64_t rank = k - b.above;
  std::nth_element(b.candidates.begin(), b.candidates.begin() + (rank - 1), b.candidates.end(),
                   [](uint64_t a, uint64_t c) { return a > c; });
  const uint64_t last = b.candidates[rank - 1];
  TopK r;
  r.t = int64_t(last >> kIndexBits);
  r.cut = int64_t(kIndexMask - (last & kIndexMask)) + 1;
  std::vector<uint64_t>().swap(b.candidates);
  return r;
}

}  // namespace

std::vector<TopK> magnitude_select(const TaskSource& s, const std::vector<int>& models,
                                   const std::vector<int64_t>& ks, int threads) {
  std::vector<Query> qs;
  for (size_t q = 0; q < models.size(); ++q) {
    Query qu;
    qu.model = models[q];
    qu.k = ks[q];
    if (ks[q] <= 0) {
      qu.done = true;  // empty set: the TopK default
    } else if (ks[q] >= s.numel) {
      qu.done = true;
      qu.result.t = -1;  // every key is > -1
    }
    qs.push_back(qu);
  }
  std::vector<Bracket> bs(qs.size());
  with_typed(s, [&](const auto& v) {
    for (size_t q = 0; q < qs.size(); ++q) {
      bs[q].usable = !qs[q].done && s.numel < (int64_t(1) << kIndexBits);
      if (bs[q].usable) choose_bracket(v, qs[q], s.numel, bs[q]);
    }
    bracket_pass(v, qs, bs, s.numel, threads);
  });
  bool radix_needed = false;
  for (size_t q = 0; q < qs.size(); ++q) {
    if (qs[q].done) continue;
    if (bs[q].usable) {
      qs[q].result = finish_bracket(bs[q], qs[q].k);
      qs[q].done = true;
    } else {
      radix_needed = true;
    }
  }
  if (radix_needed) {
    if (s.key16()) {
      refine(s, qs, 0, true, threads);
    } else {
      refine(s, qs, 16, false, threads);
      refine(s, qs, 0, true, threads);
    }
    cut(s, qs, threads);
  }
  std::vector<TopK> out;
  for (const Query& qu : qs) out.push_back(qu.result);
  return out;
}

}  // namespace fk
