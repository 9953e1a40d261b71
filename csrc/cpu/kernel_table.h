// Builds a KernelTable from lane types; included once by each ISA translation unit.
#pragma once
#include "fisher_merge.h"
#include "kernels.h"
#include "task_arithmetic.h"
#include "weighted_sum.h"

namespace fk {
namespace {

#define FK_FILL_DTYPES(table, op, V, S)                              \
  table.op[kFloat32] = &op##_range<V, S, float>;                    \
  table.op[kFloat16] = &op##_range<V, S, f16>;                      \
  table.op[kBFloat16] = &op##_range<V, S, bf16>;                    \
  table.op[kFloat64] = &op##_range<DoubleLane, DoubleLane, double>;

template <class V, class S>
KernelTable make_kernel_table() {
  KernelTable t{};
  FK_FILL_DTYPES(t, weighted_sum, V, S)
  FK_FILL_DTYPES(t, task_arithmetic, V, S)
  FK_FILL_DTYPES(t, fisher_merge, V, S)
  return t;
}

#undef FK_FILL_DTYPES

}  // namespace
}  // namespace fk
