// Plain argument blocks of the sparse kernels. Like MergeArgs they cross into the per-ISA
// translation units, so they hold plain values and pointers only (no member functions, no
// standard containers). Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#pragma once
#include <cstdint>

namespace fk {

// The top-k set {key > t} ∪ {key == t and index < cut}, keys being the bit patterns of |tau|.
// t = -1 is every element, t = 2^32 none.
struct TopK {
  int64_t t = int64_t(1) << 32;
  int64_t cut = 0;
};

// kKeepBand is set by the C++ side for a top-k rule with a non-empty lo (breadcrumbs).
enum KeepMode : int { kKeepAll = 0, kKeepTopK = 1, kKeepRandom = 2, kKeepMask = 3, kKeepBand = 4 };

// Model i keeps element j iff: all | in hi | in hi and not in lo | draw16(j) < p16 | mask[j].
struct KeepRule {
  int mode = kKeepAll;
  TopK hi, lo;
  int32_t hi_key = -1, lo_key = 0x7fffffff;  // hi.t and lo.t clamped to int32 (keys are < 2^31)
  uint32_t s1 = 0, s2 = 0;
  int32_t p16 = 0;    // 2^16 is kKeepAll
  uint32_t key0 = 0;  // s1 ^ mix32(s2): the hash key of counters below 2^32
  const uint8_t* mask = nullptr;
};

// Where the task vectors come from: tau_i = xs[i] - base in float32, or xs[i] itself when base is
// null. keys16: |tau| keys are the 16-bit inputs' own bits (16-bit xs, no base).
struct TaskArgs {
  int64_t numel = 0;
  int n = 0;
  const void* base = nullptr;
  const void* const* xs = nullptr;
  bool keys16 = false;
};

struct SparseMergeArgs {
  TaskArgs task;
  void* out = nullptr;
  const KeepRule* rules = nullptr;        // n
  const float* weights = nullptr;         // n
  const float* scales = nullptr;          // n: kept values are multiplied (or divided) by these
  bool divide = false;                    // divide: tau / scale, rounded as the reference does
  int consensus = 0;                      // 0 none, 1 sum, 2 count
  bool elect_weighted = true;
  int combine = 0;                        // 0 sum, 1 mean_count, 2 mean_weight, 3 max
  float weight_total = 0.f;               // mean_weight without consensus: the sum of the weights
  float lam = 1.f;
  int tie = 1;                            // a zero tally elects + (1), - (-1) or no one (0)
};

constexpr int kMaxLaneWidth = 16;  // floats per register of the widest lane (AVX-512)

// Candidates of the bracket pass pack (key, index) into 64 bits, so that a larger packed value
// ranks first: larger key, then lower index (the tie rule). Tensors stay below 2^33 elements.
constexpr int kCandidateIndexBits = 33;
constexpr uint64_t kCandidateIndexMask = (uint64_t(1) << kCandidateIndexBits) - 1;

// The bracket pass of magnitude_select: per query q (a model and a key range [lo, hi]) count the
// keys above hi, count the keys equal to hi and to lo per block of 2^kEqualBlockBits elements (a
// few values may be shared by millions of elements: quantised task vectors), and collect
// (key, index) of the keys strictly between lo and hi.
struct BracketArgs {
  TaskArgs task;
  int queries = 0;
  const int* models = nullptr;    // per query
  const int32_t* lo = nullptr;    // per query
  const int32_t* hi = nullptr;    // per query
};

constexpr int kEqualBlockBits = 16;

// One thread's results of the bracket pass. found[q] has room for cap entries, after which the
// query overflows (count stops growing, overflow[q] = 1). equal[(q * blocks + block) * 2 + {0, 1}]
// count the keys equal to hi and (when lo < hi) to lo in each block.
struct BracketOut {
  int64_t* above = nullptr;
  uint64_t* const* found = nullptr;
  int64_t* count = nullptr;
  int64_t* overflow = nullptr;
  int64_t cap = 0;
  int32_t* equal = nullptr;
  int64_t blocks = 0;
};

// kept_l1_norms: per model (sum |tau|, sum over kept |tau|) of one block of elements.
struct L1Args {
  TaskArgs task;
  const KeepRule* rules = nullptr;
};

using SparseMergeFn = void (*)(const SparseMergeArgs&, int64_t begin, int64_t end);
using BracketFn = void (*)(const BracketArgs&, const BracketOut&, int64_t begin, int64_t end);
// sums: 2 * n doubles, added to.
using L1Fn = void (*)(const L1Args&, int64_t begin, int64_t end, double* sums);

}  // namespace fk
