// Exact top-k by magnitude without sorting: radix select over the bit patterns of |tau| with
// 16-bit digits (one histogram pass for 16-bit keys, two for float32 keys), then, only when the
// threshold value occurs more often than needed, a count pass to place the index cut-off.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime.h"
#include "sparse.h"

namespace fk {
namespace {

constexpr int kBins = 1 << 16;

struct Query {
  int model;
  int64_t k;
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

}  // namespace

std::vector<TopK> magnitude_select(const TaskSource& s, const std::vector<int>& models,
                                   const std::vector<int64_t>& ks, int threads) {
  std::vector<Query> qs;
  for (size_t q = 0; q < models.size(); ++q) {
    Query qu{models[q], ks[q]};
    if (ks[q] <= 0) {
      qu.done = true;  // empty set: the TopK default
    } else if (ks[q] >= s.numel) {
      qu.done = true;
      qu.result.t = -1;  // every key is > -1
    }
    qs.push_back(qu);
  }
  if (s.key16()) {
    refine(s, qs, 0, true, threads);
  } else {
    refine(s, qs, 16, false, threads);
    refine(s, qs, 0, true, threads);
  }
  cut(s, qs, threads);
  std::vector<TopK> out;
  for (const Query& qu : qs) out.push_back(qu.result);
  return out;
}

}  // namespace fk
