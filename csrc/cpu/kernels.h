// Kernel tables: one per ISA, indexed by dtype code. The driver (runtime.cpp) picks a table at
// run time from the CPU's features.
#pragma once
#include "common.h"
#include "lsa_relax.h"
#include "sinkhorn_args.h"
#include "sparse_args.h"

namespace fk {

// out[r][i][j] over [rows, cols] views of xs (less base when not null); see gram_kernels.h
using GramFn = void (*)(double* out, const void* const* xs, int n, const void* base, int64_t rows, int64_t cols,
                        int threads);
// Counting passes over [begin, end), adding into counts: RAM+'s shared and lone kept elements per
// model (ram_merge.h), TIES' sign balance and ties (sign_tally.h).
using CountsFn = void (*)(const MergeArgs& a, int64_t begin, int64_t end, int64_t* counts);

// Passes over [begin, end) that add float64 sums into sums: SCE's energies (sce.h); and its mask,
// keeping `ties` of the elements equal to its threshold.
using SumsFn = void (*)(const MergeArgs& a, int64_t begin, int64_t end, double* sums);
using SceSelectFn = void (*)(const MergeArgs& a, int64_t begin, int64_t end, int64_t cut, double* sums);

// One tensor of one model in global_threshold's counting sweep (threshold_scan.h).
struct ThresholdScanArgs {
  const void* x = nullptr;
  const void* base = nullptr;  // or null
  int32_t lo = 0, hi = 0;      // keys in [lo, hi] are collected, keys > hi counted
  uint32_t* buffer = nullptr;  // the collected keys: buffer[0 .. *found), at most cap
  int64_t* found = nullptr;
  int64_t cap = 0;
};
using ThresholdScanFn = int64_t (*)(const ThresholdScanArgs& a, int64_t begin, int64_t end);

// EMR's statistics over [begin, end) (emr.h): unified vector and masks written, sums added into.
struct EmrArgs {
  int n = 0;
  const void* base = nullptr;
  const void* const* xs = nullptr;
  void* unified = nullptr;
  uint8_t* const* masks = nullptr;
};
using EmrFn = void (*)(const EmrArgs& a, int64_t begin, int64_t end, double* sums);

// arcee_fusion's importance over rows [row_begin, row_end) of [rows, cols] views (arcee.h); returns
// the rows left unwritten because they hold a non-finite value. out: float32 (float64 for float64).
using ArceeFn = int64_t (*)(void* out, const void* base, const void* x, int64_t cols, int64_t row_begin,
                            int64_t row_end, double eps);

// slerp of [rows, cols] views (slerp_kernels.h); t: n_t factors (one, or one per row).
using SlerpFn = void (*)(void* out, const void* a, const void* b, int64_t rows, int64_t cols, const double* t,
                         int64_t n_t, double dot_threshold, double eps, int threads);

// DELLA's streaming passes over one row (della_kernels.h): |tau| keys, 24-bit hash draws (alone, or
// with the masks every rank gives and the others listed), l1 sums, the listed draws' decisions by
// their digits, one key's rank.
using DellaKeysFn = uint32_t (*)(const void* x, const void* base, int64_t n, uint32_t* keys, uint32_t* range);
using DellaDrawsFn = int64_t (*)(uint32_t first, int64_t n, uint32_t key, uint32_t lo, uint32_t hi, uint32_t index0,
                                 uint32_t* draws, uint8_t* keep, uint32_t* mid);
using DellaL1Fn = void (*)(const uint32_t* keys, const uint8_t* keep, int64_t n, double* sums);
using DellaRankFn = int64_t (*)(const uint32_t* keys, int64_t n, int64_t c);
// The keep threshold of a row's rank r: floor((low + (r / last) * spread) * 2^24) in float32, clamped to
// [0, 2^24] (NaN: 0); last = cols - 1 (1 for a single column, whose one rank is 0).
struct DellaRankScale {
  float low, spread, last;
};
using DellaDecideFn = int64_t (*)(const uint32_t* mid, int64_t count, const uint32_t* digits, const uint32_t* begin,
                                  const uint32_t* draws, DellaRankScale scale, uint8_t* keep, uint32_t* exact,
                                  int64_t cap);

struct KernelTable {
  RangeFn cast[kFloat64][kFloat64];  // [from][to]: float32, float16 and bfloat16 (float64 is torch's)
  RangeFn weighted_sum[kNumDTypes];
  RangeFn task_arithmetic[kNumDTypes];
  RangeFn fisher_merge[kNumDTypes];
  // Sparse kernels: float32, float16 and bfloat16 only (null for float64).
  SparseMergeFn sparse_merge[kNumDTypes];
  BracketFn bracket[kNumDTypes];
  L1Fn kept_l1[kNumDTypes];
  SinkhornKernels<float> sinkhorn32;
  SinkhornKernels<double> sinkhorn64;
  LsaRelaxFn<double> lsa_relax64;  // float64 costs
  LsaRelaxFn<float> lsa_relax32;   // float32 costs
  LsaTop2Fn<double> lsa_top2_64;
  LsaTop2Fn<float> lsa_top2_32;
  GramFn gram[kNumDTypes];
  RangeFn ram_merge[kNumDTypes];
  RangeFn magmax[kNumDTypes];
  CountsFn ram_counts[kNumDTypes];
  CountsFn sign_tally[kNumDTypes];  // float32, float16 and bfloat16 only (null for float64)
  ThresholdScanFn threshold_scan[kNumDTypes];  // float32, float16 and bfloat16 only
  EmrFn emr[kNumDTypes];  // float32, float16 and bfloat16 only
  ArceeFn arcee_importance[kNumDTypes];
  RangeFn arcee_select[kNumDTypes];
  RangeFn nearswap[kNumDTypes];
  SlerpFn slerp[kNumDTypes];  // float32, float16 and bfloat16 only (null for float64)
  CountsFn sce_variance[kNumDTypes];  // float32, float16 and bfloat16 only
  SumsFn sce_energies[kNumDTypes];    // float32, float16 and bfloat16 only
  CountsFn sce_tally[kNumDTypes];     // float32, float16 and bfloat16 only
  SceSelectFn sce_select[kNumDTypes];  // float32, float16 and bfloat16 only
  DellaKeysFn della_keys[kNumDTypes];  // float32, float16 and bfloat16 only
  DellaDrawsFn della_draws;
  DellaL1Fn della_l1;
  DellaRankFn della_rank;
  DellaDecideFn della_decide;
};

const KernelTable& portable_kernels();
#ifdef FK_HAVE_AVX2
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#endif

}  // namespace fk
