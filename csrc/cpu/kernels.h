// Kernel tables: one per ISA, indexed by dtype code. The driver (runtime.cpp) picks a table at
// run time from the CPU's features.
#pragma once
#include "common.h"

namespace fk {

struct KernelTable {
  RangeFn weighted_sum[kNumDTypes];
  RangeFn task_arithmetic[kNumDTypes];
  RangeFn fisher_merge[kNumDTypes];
};

const KernelTable& portable_kernels();
#ifdef FK_HAVE_AVX2
const KernelTable& avx2_kernels();
#endif

}  // namespace fk
