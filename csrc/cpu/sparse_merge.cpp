// Drivers of the fused sparse merge and the kept-L1 sums: argument blocks and the split over
// threads; the element loops are the active ISA's (sparse_kernels.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime.h"
#include "sparse.h"

namespace fk {
namespace {

constexpr int64_t kNormBlock = int64_t(1) << 16;

}  // namespace

std::vector<double> kept_l1_norms(const TaskSource& s, const std::vector<KeepRule>& rules, int threads) {
  const int n_models = static_cast<int>(s.xs.size());
  const int64_t blocks = (s.numel + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(size_t(blocks) * n_models * 2, 0.0);
  L1Args a;
  a.task = s.args();
  a.rules = rules.data();
  const L1Fn fn = active_kernels().kept_l1[s.dtype];
  const int t = plan_threads(s.numel, threads);
  parallel_tasks(blocks, t, [&](int64_t nb) {
    fn(a, nb * kNormBlock, std::min(s.numel, (nb + 1) * kNormBlock), partial.data() + size_t(nb) * n_models * 2);
  });
  std::vector<double> norms(size_t(n_models) * 2, 0.0);
  for (int64_t nb = 0; nb < blocks; ++nb)  // block order: the same sums for any thread count
    for (size_t q = 0; q < norms.size(); ++q) norms[q] += partial[size_t(nb) * norms.size() + q];
  return norms;
}

void sparse_merge(void* out, const TaskSource& s, const std::vector<KeepRule>& rules, const SparseMergeOptions& o,
                  int threads) {
  SparseMergeArgs a;
  a.task = s.args();
  a.out = out;
  a.rules = rules.data();
  a.weights = o.weights.data();
  a.scales = o.scales.data();
  a.divide = o.divide;
  a.consensus = o.consensus;
  a.elect_weighted = o.elect_weighted;
  a.combine = o.combine;
  a.weight_total = o.weight_total;
  a.lam = o.lam;
  const SparseMergeFn fn = active_kernels().sparse_merge[s.dtype];
  parallel_chunks(s.numel, plan_threads(s.numel, threads), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

}  // namespace fk
