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

struct KernelTable {
  RangeFn weighted_sum[kNumDTypes];
  RangeFn task_arithmetic[kNumDTypes];
  RangeFn fisher_merge[kNumDTypes];
  // Sparse kernels: float32, float16 and bfloat16 only (null for float64).
  SparseMergeFn sparse_merge[kNumDTypes];
  BracketFn bracket[kNumDTypes];
  L1Fn kept_l1[kNumDTypes];
  SinkhornKernels<float> sinkhorn32;
  SinkhornKernels<double> sinkhorn64;
  LsaRelaxFn lsa_relax;
  GramFn gram[kNumDTypes];
  RangeFn ram_merge[kNumDTypes];
  CountsFn ram_counts[kNumDTypes];
  CountsFn sign_tally[kNumDTypes];  // float32, float16 and bfloat16 only (null for float64)
};

const KernelTable& portable_kernels();
#ifdef FK_HAVE_AVX2
const KernelTable& avx2_kernels();
#endif

}  // namespace fk
