// Builds a KernelTable from lane types; included once by each ISA translation unit.
#pragma once
#include "arcee.h"
#include "cast.h"
#include "della_kernels.h"
#include "emr.h"
#include "fisher_merge.h"
#include "gram_kernels.h"
#include "kernels.h"
#include "magmax.h"
#include "nearswap.h"
#include "ram_merge.h"
#include "sce.h"
#include "sign_tally.h"
#include "threshold_scan.h"
#include "sinkhorn_kernels.h"
#include "slerp_kernels.h"
#include "sparse_kernels.h"
#include "task_arithmetic.h"
#include "weighted_sum.h"

namespace fk {
namespace {

#define FK_FILL_DTYPES(table, op, V, S)                              \
  table.op[kFloat32] = &op##_range<V, S, float>;                    \
  table.op[kFloat16] = &op##_range<V, S, f16>;                      \
  table.op[kBFloat16] = &op##_range<V, S, bf16>;                    \
  table.op[kFloat64] = &op##_range<DoubleLane, DoubleLane, double>;

#define FK_FILL_SPARSE(table, slot, fn, V, S)   \
  table.slot[kFloat32] = &fn<V, S, float>;      \
  table.slot[kFloat16] = &fn<V, S, f16>;        \
  table.slot[kBFloat16] = &fn<V, S, bf16>;      \
  table.slot[kFloat64] = nullptr;

#define FK_FILL_CAST_FROM(table, V, S, From, code)               \
  table.cast[code][kFloat32] = &cast_range<V, S, From, float>;   \
  table.cast[code][kFloat16] = &cast_range<V, S, From, f16>;     \
  table.cast[code][kBFloat16] = &cast_range<V, S, From, bf16>;

template <class V, class S>
KernelTable make_kernel_table() {
  KernelTable t{};
  FK_FILL_CAST_FROM(t, V, S, float, kFloat32)
  FK_FILL_CAST_FROM(t, V, S, f16, kFloat16)
  FK_FILL_CAST_FROM(t, V, S, bf16, kBFloat16)
  FK_FILL_DTYPES(t, weighted_sum, V, S)
  FK_FILL_DTYPES(t, task_arithmetic, V, S)
  FK_FILL_DTYPES(t, fisher_merge, V, S)
  FK_FILL_DTYPES(t, ram_merge, V, S)
  FK_FILL_DTYPES(t, magmax, V, S)
  FK_FILL_DTYPES(t, ram_counts, V, S)
  FK_FILL_DTYPES(t, arcee_importance, V, S)
  FK_FILL_DTYPES(t, arcee_select, V, S)
  FK_FILL_DTYPES(t, nearswap, V, S)
  FK_FILL_SPARSE(t, sign_tally, sign_tally_range, V, S)
  FK_FILL_SPARSE(t, threshold_scan, threshold_scan_range, V, S)
  FK_FILL_SPARSE(t, emr, emr_range, V, S)
  FK_FILL_SPARSE(t, sce_variance, sce_variance_range, V, S)
  FK_FILL_SPARSE(t, sce_energies, sce_energies_range, V, S)
  FK_FILL_SPARSE(t, sce_tally, sce_tally_range, V, S)
  FK_FILL_SPARSE(t, sce_select, sce_select_range, V, S)
  FK_FILL_SPARSE(t, sparse_merge, sparse_merge_range, V, S)
  FK_FILL_SPARSE(t, bracket, bracket_range, V, S)
  FK_FILL_SPARSE(t, kept_l1, kept_l1_range, V, S)
  t.della_keys[kFloat32] = &della_keys_range<V, S, float>;
  t.della_keys[kFloat16] = &della_keys_range<V, S, f16>;
  t.della_keys[kBFloat16] = &della_keys_range<V, S, bf16>;
  t.della_draws = &della_draws_range<V, S>;
  t.della_l1 = &della_l1_range<V, S>;
  t.della_rank = &della_rank_range<V, S>;
  t.della_decide = &della_decide_range<V, S>;
  t.sinkhorn32 = make_sinkhorn_kernels<V, S, float>();
  t.sinkhorn64 = make_sinkhorn_kernels<DoubleLane, DoubleLane, double>();
  t.lsa_relax64 = &lsa_relax_scalar<double>;
  t.lsa_relax32 = &lsa_relax_scalar<float>;
  t.lsa_top2_64 = &lsa_top2_scalar<double>;
  t.lsa_top2_32 = &lsa_top2_scalar<float>;
  t.gram[kFloat32] = &gram_range<float>;
  t.gram[kFloat16] = &gram_range<f16>;
  t.gram[kBFloat16] = &gram_range<bf16>;
  t.gram[kFloat64] = &gram_range<double>;
  t.slerp[kFloat32] = &slerp_rows<V, S, float>;
  t.slerp[kFloat16] = &slerp_rows<V, S, f16>;
  t.slerp[kBFloat16] = &slerp_rows<V, S, bf16>;
  return t;
}

#undef FK_FILL_DTYPES
#undef FK_FILL_SPARSE

}  // namespace
}  // namespace fk
