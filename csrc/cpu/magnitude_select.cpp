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
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "runtime.h"
#include "sparse.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int kBins = 1 << 16;

// key(i, j): the magnitude key of element j of model i (scalar, for the sampling and the rare
// fallback passes; the bracket pass runs the ISA's kernel). touch(i, j): starts loading that
// element (and the base's) into cache.
template <class View>
struct KeyOf {
  const View& v;
  uint32_t operator()(int i, int64_t j) const {
    using L = ScalarLane;
    return uint32_t(v.template key<L>(i, j, v.template tau<L>(i, j, v.template base_at<L>(j))));
  }
  void touch(int i, int64_t j) const {
    __builtin_prefetch(v.xs[i] + j);
    if constexpr (View::has_base) __builtin_prefetch(v.base + j);
  }
};

// Calls f(key_of), a KeyOf of the source's storage type and view.
template <class F>
void with_keys(const TaskSource& s, F&& f) {
  const TaskArgs a = s.args();
  with_storage(s.dtype, [&](auto tag) {
    with_task_view<decltype(tag)>(a, [&](const auto& v) { f(KeyOf<std::decay_t<decltype(v)>>{v}); });
  });
}

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
  with_keys(s, [&](const auto& key_of) {
    parallel_pieces(n, t, [&](int tid, int64_t begin, int64_t end) {
      uint32_t* h = hist.data() + size_t(tid) * nq * kBins;
      for (int64_t j = begin; j < end; ++j) {
        for (size_t q = 0; q < nq; ++q) {
          if (qs[q].done) continue;
          const uint32_t key = key_of(qs[q].model, j);
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
    with_keys(s, [&](const auto& key_of) {
      const auto matches = [&](int64_t j) { return key_of(qu.model, j) == uint32_t(qu.result.t); };
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

// The sample: n/64 keys, at least 2^13 (or all n) and at most 2^18. Sorting it is the select's
// fixed cost; a bracket from s samples holds ~8·n·sqrt(r(1-r)/s) candidates, so a sample that
// grows with n keeps both small (a fixed 2^18 cost a [256, 2048] tensor as much as one 8x larger).
// The keys are drawn in runs of kSampleRun neighbours: lone keys 64 apart touched nearly every
// cache line of the inputs (the prefetcher fetches line pairs), as much memory traffic as a pass.
constexpr int64_t kSampleRun = 16;
constexpr int64_t kSampleAhead = 8;  // runs whose lines are requested before their keys are read

inline int64_t sample_count(int64_t n) {
  const int64_t s = std::clamp(n >> 6, int64_t(1) << 13, int64_t(1) << 18);
  return s >= n ? n : s / kSampleRun * kSampleRun;
}

// Where sample i lies: run i / kSampleRun starts in the run's own n / runs window, shifted within
// it by a Weyl sequence, so that on a [rows, cols] tensor the runs do not all fall on the same few
// columns of every row (the windows' length often divides cols).
inline int64_t sample_position(int64_t i, int64_t samples, int64_t n) {
  if (samples == n) return i;
  const int64_t runs = samples / kSampleRun, run = i / kSampleRun;
  const uint64_t room = uint64_t(n / runs - kSampleRun + 1);
  const uint64_t shift = (uint64_t(uint32_t(uint64_t(run) * 0x9E3779B9u)) * room) >> 32;
  return run * n / runs + int64_t(shift) + i % kSampleRun;
}

struct Bracket {
  int32_t lo = 0, hi = 0x7fffffff;  // the bracket's end keys: candidates lie strictly between
  int64_t above = 0, at_hi = 0, at_lo = 0;  // keys > hi, == hi, == lo (lo < hi)
  std::vector<int64_t> hi_blocks, lo_blocks;  // keys == hi / == lo per block of 2^kEqualBlockBits
  std::vector<uint64_t> candidates;  // packed (key, index), see kCandidateIndexBits
  bool usable = false;
};

// The keys of one model at sample positions [first, last) of sample_count(n) spread over its n
// elements, sorted in descending order: a part of the sample every query on that model
// brackets from.
template <class K>
std::vector<uint32_t> sample_keys(const K& key_of, int model, int64_t n, int64_t first, int64_t last) {
  const int64_t samples = sample_count(n), count = last - first;
  std::vector<uint32_t> keys(count), spare(count);
  for (int64_t i = 0; i < count;) {  // a run at a time: its positions are consecutive
    const int64_t at = first + i, start = sample_position(at, samples, n);
    const int64_t run = std::min(count - i, samples == n ? count - i : kSampleRun - at % kSampleRun);
    // the runs lie far apart, each a cache miss: the one kSampleAhead runs on is requested now, so
    // that the misses overlap (the loads waiting on them took two thirds of the sampling's time)
    if (samples != n && at + kSampleAhead * kSampleRun < samples)
      key_of.touch(model, sample_position(at + kSampleAhead * kSampleRun, samples, n));
    for (int64_t o = 0; o < run; ++o) keys[i + o] = ~key_of(model, start + o);  // ascending ~key: descending key
    i += run;
  }
  // LSD radix sort, 11-bit digits, skipping a digit every key shares: a few passes, where each
  // query's nth_element pair cost more on several queries per model (arcee_fusion's quartiles)
  constexpr int kDigit = 11, kRadix = 1 << kDigit;
  for (int shift = 0; shift < 32; shift += kDigit) {
    std::vector<uint32_t> at(kRadix, 0);
    for (const uint32_t k : keys) ++at[(k >> shift) & (kRadix - 1)];
    if (std::find(at.begin(), at.end(), uint32_t(count)) != at.end()) continue;
    uint32_t sum = 0;
    for (uint32_t& a : at) sum += std::exchange(a, sum);
    for (const uint32_t k : keys) spare[at[(k >> shift) & (kRadix - 1)]++] = k;
    keys.swap(spare);
  }
  for (uint32_t& k : keys) k = ~k;
  return keys;
}

// Each model's whole sample, sorted in descending order: its parts drawn and sorted on all threads
// (one model, arcee_fusion's quartiles, would leave all but one idle), then merged.
template <class K>
std::vector<std::vector<uint32_t>> sorted_samples(const K& key_of, const std::vector<int>& models, int64_t n, int t) {
  const int64_t m = static_cast<int64_t>(models.size()), samples = sample_count(n);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(t / std::max<int64_t>(m, 1), samples >> 12));
  std::vector<std::vector<uint32_t>> pieces(static_cast<size_t>(m * parts));
  parallel_tasks(m * parts, t, [&](int64_t task) {
    const int64_t part = task % parts;
    pieces[size_t(task)] = sample_keys(key_of, models[size_t(task / parts)], n, part * samples / parts,
                                       (part + 1) * samples / parts);
  });
  std::vector<std::vector<uint32_t>> out(static_cast<size_t>(m));
  for (int64_t model = 0; model < m; ++model) {
    std::vector<uint32_t>& merged = out[size_t(model)];
    for (int64_t part = 0; part < parts; ++part) {
      const std::vector<uint32_t>& piece = pieces[size_t(model * parts + part)];
      const size_t mid = merged.size();
      merged.insert(merged.end(), piece.begin(), piece.end());
      std::inplace_merge(merged.begin(), merged.begin() + mid, merged.end(), std::greater<uint32_t>());
    }
  }
  return out;
}

// Pick a bracket around the k-th largest key that holds it with overwhelming probability (± 4
// binomial standard deviations + slack around its rank in the sample, sorted in descending order).
inline void choose_bracket(const std::vector<uint32_t>& keys, const Query& q, int64_t n, Bracket& b) {
  const int64_t samples = static_cast<int64_t>(keys.size());
  const double r = double(q.k) / double(n);
  const double pos = r * double(samples);
  const double spread = 4.0 * std::sqrt(double(samples) * r * (1.0 - r)) + 16.0;
  const int64_t top = std::max<int64_t>(0, int64_t(pos - spread));
  const int64_t bottom = std::min<int64_t>(samples - 1, int64_t(pos + spread));
  b.lo = key_threshold(bottom >= samples - 1 ? 0 : keys[bottom]);
  b.hi = key_threshold(top == 0 ? int64_t(0x7fffffff) : keys[top]);
}

// One pass for all usable queries (the ISA's bracket kernel): count the keys above each bracket
// and at its ends, and collect the keys inside it into per-thread buffers of bounded size.
void bracket_pass(const TaskSource& s, const std::vector<Query>& qs, std::vector<Bracket>& bs, int threads) {
  std::vector<int> models, which;
  std::vector<int32_t> lo, hi;
  for (size_t q = 0; q < qs.size(); ++q) {
    if (!bs[q].usable) continue;
    which.push_back(static_cast<int>(q));
    models.push_back(qs[q].model);
    lo.push_back(bs[q].lo);
    hi.push_back(bs[q].hi);
  }
  const size_t nq = which.size();
  if (nq == 0) return;
  BracketArgs a;
  a.task = s.args();
  a.queries = static_cast<int>(nq);
  a.models = models.data();
  a.lo = lo.data();
  a.hi = hi.data();
  const int t = plan_threads(s.numel, threads);
  // Per thread and query, the whole pass's cap: pieces go to whichever thread is free, so one
  // thread may see all of them (the buffers' pages are only touched as candidates arrive).
  const int64_t cap = std::max<int64_t>(int64_t(1) << 20, s.numel / 32);
  const int64_t blocks = (s.numel >> kEqualBlockBits) + 1;
  // Per-thread counters a whole number of cache lines apart (the kernel updates them per vector).
  const size_t stride = (nq + 7) / 8 * 8 + 8;
  // Uninitialised on purpose: pages of a buffer are only touched as candidates arrive.
  std::vector<std::unique_ptr<uint64_t[]>> buffers;
  std::vector<uint64_t*> found;
  for (size_t b = 0; b < size_t(t) * stride; ++b) {
    buffers.emplace_back(b % stride < nq ? new uint64_t[cap] : nullptr);
    found.push_back(buffers.back().get());
  }
  std::vector<int64_t> above(size_t(t) * stride, 0), count(size_t(t) * stride, 0), overflow(size_t(t) * stride, 0);
  const size_t equal_stride = nq * size_t(blocks) * 2 + 16;
  std::vector<int32_t> equal(size_t(t) * equal_stride, 0);
  const BracketFn fn = active_kernels().bracket[s.dtype];
  parallel_chunks(s.numel, t, [&](int64_t begin, int64_t end) {  // a preempted thread delays one piece only
    const int tid = team_thread();
    const size_t at = size_t(tid) * stride;
    BracketOut o;
    o.above = above.data() + at;
    o.found = found.data() + at;
    o.count = count.data() + at;
    o.overflow = overflow.data() + at;
    o.cap = cap;
    o.equal = equal.data() + size_t(tid) * equal_stride;
    o.blocks = blocks;
    fn(a, o, begin, end);
  });
  for (size_t u = 0; u < nq; ++u) {
    Bracket& b = bs[which[u]];
    b.hi_blocks.assign(blocks, 0);
    b.lo_blocks.assign(blocks, 0);
    size_t total = 0;
    for (int tid = 0; tid < t; ++tid) total += size_t(count[size_t(tid) * stride + u]);
    b.candidates.reserve(total);
    for (int tid = 0; tid < t; ++tid) {
      const size_t at = size_t(tid) * stride + u;
      b.usable = b.usable && !overflow[at];
      b.above += above[at];
      b.candidates.insert(b.candidates.end(), found[at], found[at] + count[at]);
      const int32_t* eq = equal.data() + size_t(tid) * equal_stride + u * size_t(blocks) * 2;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        b.hi_blocks[blk] += eq[2 * blk];
        b.lo_blocks[blk] += eq[2 * blk + 1];
      }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      b.at_hi += b.hi_blocks[blk];
      b.at_lo += b.lo_blocks[blk];
    }
    const int64_t k = qs[which[u]].k;
    b.usable = b.usable && b.above < k && k <= b.above + b.at_hi + int64_t(b.candidates.size()) + b.at_lo;
  }
}

// The index just past the rank-th (1-based) element of `model` whose key is `key`, found from the
// per-block counts and a scan of the one block that holds it.
template <class K>
int64_t cut_after(const K& key_of, int model, int32_t key, const std::vector<int64_t>& per_block, int64_t rank,
                  int64_t n) {
  int64_t blk = 0;
  while (rank > per_block[blk]) rank -= per_block[blk++];
  for (int64_t j = blk << kEqualBlockBits;; ++j) {
    if (j >= n) return n;  // unreachable: the counts hold rank elements
    if (int32_t(key_of(model, j)) == key && --rank == 0) return j + 1;
  }
}

// The exact TopK from a usable bracket. Ranked from the top: keys above hi, keys equal to hi
// (index order), the candidates (packed order: key, then index), keys equal to lo.
template <class K>
TopK finish_bracket(const K& key_of, Bracket& b, const Query& q, int64_t n) {
  int64_t rank = q.k - b.above;
  TopK r;
  if (rank <= b.at_hi) {
    r.t = b.hi;
    r.cut = cut_after(key_of, q.model, b.hi, b.hi_blocks, rank, n);
  } else if ((rank -= b.at_hi) <= int64_t(b.candidates.size())) {
    std::nth_element(b.candidates.begin(), b.candidates.begin() + (rank - 1), b.candidates.end(),
                     [](uint64_t x, uint64_t y) { return x > y; });
    const uint64_t last = b.candidates[rank - 1];
    r.t = int64_t(last >> kCandidateIndexBits);
    r.cut = int64_t(kCandidateIndexMask - (last & kCandidateIndexMask)) + 1;
  } else {
    rank -= int64_t(b.candidates.size());
    r.t = b.lo;
    r.cut = cut_after(key_of, q.model, b.lo, b.lo_blocks, rank, n);
  }
  b = Bracket();
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
  const int64_t nq = static_cast<int64_t>(qs.size());
  const int t = plan_threads(s.numel, threads);
  std::vector<Bracket> bs(qs.size());
  std::vector<int> sampled;  // the models some query brackets on: each sampled once
  for (int64_t q = 0; q < nq; ++q) {
    bs[q].usable = !qs[q].done && s.numel < (int64_t(1) << kCandidateIndexBits);
    if (bs[q].usable && std::find(sampled.begin(), sampled.end(), qs[q].model) == sampled.end())
      sampled.push_back(qs[q].model);
  }
  std::vector<std::vector<uint32_t>> samples;
  with_keys(s, [&](const auto& key_of) { samples = sorted_samples(key_of, sampled, s.numel, t); });
  for (int64_t q = 0; q < nq; ++q) {
    if (!bs[q].usable) continue;
    const size_t m = size_t(std::find(sampled.begin(), sampled.end(), qs[q].model) - sampled.begin());
    choose_bracket(samples[m], qs[q], s.numel, bs[q]);
  }
  bracket_pass(s, qs, bs, threads);
  with_keys(s, [&](const auto& key_of) {
    parallel_tasks(nq, t, [&](int64_t q) {
      if (!qs[q].done && bs[q].usable) {
        qs[q].result = finish_bracket(key_of, bs[q], qs[q], s.numel);
        qs[q].done = true;
      }
    });
  });
  bool radix_needed = false;
  for (const Query& qu : qs) radix_needed = radix_needed || !qu.done;
  if (radix_needed) {
    if (s.args().keys16) {
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
