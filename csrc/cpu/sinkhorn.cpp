// The Sinkhorn loop: alternating log-domain half-steps on every matrix still iterating, each
// half-step spread over threads as (matrix, row block) or (matrix, column block) tasks. The
// row-marginal error comes free from the f half-step: with f' the updated potential, row i of the
// current plan sums to a_i·exp((f_i − f'_i)/reg).
#include "sinkhorn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime.h"

namespace fk {
namespace {

template <class T>
void sinkhorn_typed(const SinkhornProblem& p, const SinkhornKernels<T>& k, int threads) {
  const int64_t B = p.batch, n = p.n, m = p.m;
  const T* cost = static_cast<const T*>(p.cost);
  const T* log_a = static_cast<const T*>(p.log_a);
  const T* log_b = static_cast<const T*>(p.log_b);
  T* f = static_cast<T*>(p.f);
  T* g = static_cast<T*>(p.g);
  const T reg = T(p.reg);
  auto view = [&](int64_t b) { return CostView<T>{cost + b * n * m, n, m, T(1.0 / p.reg)}; };
  std::fill(f, f + B * n, T(0));
  std::fill(g, g + B * m, T(0));
  std::vector<T> lse_f(size_t(B * n)), lse_g(size_t(B * m));
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t(1) << 15) / m);
  const int64_t row_blocks = (n + rows_per_task - 1) / rows_per_task;
  const int64_t col_blocks = (m + kLseColumns - 1) / kLseColumns;
  const int nt = plan_threads(B * n * m, threads);
  std::vector<int64_t> active(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) active[size_t(b)] = b;

  for (int64_t it = 0; !active.empty(); ++it) {
    parallel_tasks(int64_t(active.size()) * row_blocks, nt, [&](int64_t t) {
      const int64_t b = active[size_t(t / row_blocks)], r0 = (t % row_blocks) * rows_per_task;
      const int64_t r1 = std::min(n, r0 + rows_per_task);
      k.lse_rows(view(b), g + b * m, r0, r1, lse_f.data() + b * n + r0);
    });
    const bool check = it > 0 && (it % p.check_every == 0 || it == p.max_iter);
    std::vector<int64_t> still;
    for (int64_t b : active) {
      T* fb = f + b * n;
      const T* la = log_a + b * n;
      const T* lse = lse_f.data() + b * n;
      if (check) {
        double error = 0;
        for (int64_t i = 0; i < n; ++i) {
          const T updated = reg * (la[i] - lse[i]);
          error += std::exp(double(la[i])) * std::fabs(std::expm1(double(fb[i] - updated) / p.reg));
        }
        if (error <= p.tol || it == p.max_iter) {
          p.error[b] = error;
          p.iterations[b] = it;
          continue;  // this matrix keeps (f, g): the plan they give has exact column sums
        }
      }
      for (int64_t i = 0; i < n; ++i) fb[i] = reg * (la[i] - lse[i]);
      still.push_back(b);
    }
    active.swap(still);
    parallel_tasks(int64_t(active.size()) * col_blocks, nt, [&](int64_t t) {
      const int64_t b = active[size_t(t / col_blocks)], c0 = (t % col_blocks) * kLseColumns;
      const int64_t c1 = std::min(m, c0 + kLseColumns);
      k.lse_cols(view(b), f + b * n, c0, c1, lse_g.data() + b * m + c0);
    });
    for (int64_t b : active)
      for (int64_t j = 0; j < m; ++j) g[b * m + j] = reg * (log_b[b * m + j] - lse_g[size_t(b * m + j)]);
  }

  T* plan = static_cast<T*>(p.plan);
  parallel_tasks(B * row_blocks, nt, [&](int64_t t) {
    const int64_t b = t / row_blocks, r0 = (t % row_blocks) * rows_per_task, r1 = std::min(n, r0 + rows_per_task);
    k.plan_rows(view(b), f + b * n, g + b * m, r0, r1, plan + b * n * m, p.log_plan);
  });
}

}  // namespace

void sinkhorn(const SinkhornProblem& problem, int dtype, int threads) {
  const KernelTable& k = active_kernels();
  if (dtype == kFloat64)
    sinkhorn_typed<double>(problem, k.sinkhorn64, threads);
  else
    sinkhorn_typed<float>(problem, k.sinkhorn32, threads);
}

}  // namespace fk
