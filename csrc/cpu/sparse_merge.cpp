// Fused sparse task-vector merge: keep rule, rescale, sign election and combine in one pass over
// base + N inputs, with no N-sized temporaries. Blocks of kBlock elements
// with branch-free inner loops, which the compiler vectorises.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "runtime.h"
#include "sparse.h"

namespace fk {
namespace {

constexpr int64_t kNormBlock = int64_t(1) << 16;

// Length of the block starting at j0 (never crossing a 2^32 index boundary: the hash splits j there).
inline int block_length(int64_t j0, int64_t end) {
  const int64_t to_boundary = (int64_t(1) << 32) - (j0 & 0xffffffffLL);
  return static_cast<int>(std::min<int64_t>({int64_t(kBlock), end - j0, to_boundary}));
}

}  // namespace

std::vector<double> kept_l1_norms(const TaskSource& s, const std::vector<KeepRule>& rules, int threads) {
  const int n_models = static_cast<int>(s.xs.size());
  const int64_t blocks = (s.numel + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(size_t(blocks) * n_models * 2, 0.0);
  const int t = plan_threads(s.numel, threads);
  with_typed(s, [&](const auto& v) {
    parallel_pieces(blocks, static_cast<int>(std::min<int64_t>(t, blocks)), [&](int, int64_t b0, int64_t b1) {
      float b[kBlock], tau[kBlock];
      uint32_t keys[kBlock];
      uint8_t keep[kBlock];
      for (int64_t nb = b0; nb < b1; ++nb) {
        double* p = partial.data() + size_t(nb) * n_models * 2;
        const int64_t end = std::min(s.numel, (nb + 1) * kNormBlock);
        for (int64_t j0 = nb * kNormBlock; j0 < end;) {
          const int m = block_length(j0, end);
          base_block(v, j0, m, b);
          for (int i = 0; i < n_models; ++i) {
            task_block(v, i, j0, m, b, tau, keys);
            keep_block(rules[i], j0, m, keys, keep);
            for (int j = 0; j < m; ++j) {
              const double mag = std::fabs(double(tau[j]));
              p[2 * i] += mag;
              p[2 * i + 1] += keep[j] ? mag : 0.0;
            }
          }
          j0 += m;
        }
      }
    });
  });
  std::vector<double> norms(size_t(n_models) * 2, 0.0);
  for (int64_t nb = 0; nb < blocks; ++nb)  // block order: the same sums for any thread count
    for (size_t q = 0; q < norms.size(); ++q) norms[q] += partial[size_t(nb) * norms.size() + q];
  return norms;
}

void sparse_merge(void* out, const TaskSource& s, const std::vector<KeepRule>& rules, const SparseMergeOptions& o,
                  int threads) {
  const int n_models = static_cast<int>(s.xs.size());
  with_typed(s, [&](const auto& v) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(v.base)>>;
    T* dst = static_cast<T*>(out);
    parallel_pieces(s.numel, plan_threads(s.numel, threads), [&](int, int64_t begin, int64_t end) {
      // Per block: each model's kept values and votes, then election and combine, all in arrays.
      std::vector<float> kept(size_t(n_models) * kBlock), votes(size_t(n_models) * kBlock);
      float b[kBlock], tau[kBlock], tally[kBlock], merged[kBlock], agreeing[kBlock], agreeing_w[kBlock];
      uint32_t keys[kBlock];
      uint8_t keep[kBlock];
      for (int64_t j0 = begin; j0 < end;) {
        const int m = block_length(j0, end);
        base_block(v, j0, m, b);
        for (int j = 0; j < m; ++j) tally[j] = 0.f;
        for (int i = 0; i < n_models; ++i) {
          float* k = kept.data() + size_t(i) * kBlock;
          float* vote = votes.data() + size_t(i) * kBlock;
          const float scale = o.scales[i], w = o.weights[i];
          task_block(v, i, j0, m, b, tau, keys);
          keep_block(rules[i], j0, m, keys, keep);
          if (o.divide) {
            for (int j = 0; j < m; ++j) k[j] = keep[j] ? tau[j] / scale : 0.f;
          } else {
            for (int j = 0; j < m; ++j) k[j] = keep[j] ? tau[j] * scale : 0.f;
          }
          if (o.consensus == 0) continue;  // no election: votes are not needed
          if (o.elect_weighted) {
            for (int j = 0; j < m; ++j) vote[j] = k[j] * w;
          } else {
            for (int j = 0; j < m; ++j) vote[j] = k[j];
          }
          if (o.consensus == 2) {
            for (int j = 0; j < m; ++j) tally[j] += float(vote[j] > 0.f) - float(vote[j] < 0.f);
          } else {
            for (int j = 0; j < m; ++j) tally[j] += vote[j];
          }
        }
        for (int j = 0; j < m; ++j) merged[j] = agreeing[j] = agreeing_w[j] = 0.f;
        if (o.consensus == 0) {
          for (int i = 0; i < n_models; ++i) {
            const float* k = kept.data() + size_t(i) * kBlock;
            const float w = o.weights[i];
            for (int j = 0; j < m; ++j) merged[j] += k[j] * w;
          }
          for (int j = 0; j < m; ++j) agreeing[j] = float(n_models);
        } else {
          for (int j = 0; j < m; ++j) tally[j] = tally[j] >= 0.f ? 1.f : -1.f;  // the elected sign
          for (int i = 0; i < n_models; ++i) {
            const float* k = kept.data() + size_t(i) * kBlock;
            const float* vote = votes.data() + size_t(i) * kBlock;
            const float w = o.weights[i];
            for (int j = 0; j < m; ++j) {
              // vote and elected sign agree iff their product is positive (a zero vote never agrees)
              const bool agree = vote[j] * tally[j] > 0.f;
              merged[j] += agree ? k[j] * w : 0.f;
              agreeing[j] += agree ? 1.f : 0.f;
              agreeing_w[j] += agree ? w : 0.f;
            }
          }
        }
        for (int j = 0; j < m; ++j) {
          float r = merged[j];
          if (o.combine == 1) {
            r /= std::max(agreeing[j], 1.f);
          } else if (o.combine == 2) {
            const float divisor = o.consensus != 0 ? agreeing_w[j] : o.weight_total;
            r /= divisor == 0.f ? 1.f : divisor;
          }
          if (o.lam != 1.f) r *= o.lam;
          ScalarLane::store(dst + j0 + j, v.base ? b[j] + r : r);
        }
        j0 += m;
      }
    });
  });
}

}  // namespace fk
