// Fused sparse task-vector merge: keep rule, rescale, sign election and combine in one pass over
// base + N inputs, with no N-sized temporaries. Scalar code; the compiler vectorises what it can.
#include <cmath>
#include <cstdint>
#include <vector>

#include "runtime.h"
#include "sparse.h"

namespace fk {
namespace {

constexpr int64_t kNormBlock = int64_t(1) << 16;

inline float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

inline void store_float(void* out, int dtype, int64_t j, float v) {
  switch (dtype) {
    case kFloat16: static_cast<uint16_t*>(out)[j] = float_to_f16(v); break;
    case kBFloat16: static_cast<uint16_t*>(out)[j] = float_to_bf16(v); break;
    default: static_cast<float*>(out)[j] = v;
  }
}

}  // namespace

std::vector<double> kept_l1_norms(const TaskSource& s, const std::vector<KeepRule>& rules, int threads) {
  const int n_models = static_cast<int>(s.xs.size());
  const int64_t blocks = (s.numel + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(size_t(blocks) * n_models * 2, 0.0);
  const int t = plan_threads(s.numel, threads);
  parallel_pieces(blocks, std::min<int64_t>(t, blocks), [&](int, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* p = partial.data() + size_t(b) * n_models * 2;
      const int64_t end = std::min(s.numel, (b + 1) * kNormBlock);
      for (int64_t j = b * kNormBlock; j < end; ++j) {
        for (int i = 0; i < n_models; ++i) {
          const float tau = task_value(s, i, j);
          const double mag = std::fabs(double(tau));
          p[2 * i] += mag;
          if (keeps(rules[i], j, magnitude_key(s, i, j, tau))) p[2 * i + 1] += mag;
        }
      }
    }
  });
  std::vector<double> norms(size_t(n_models) * 2, 0.0);
  for (int64_t b = 0; b < blocks; ++b)  // block order: the same sums for any thread count
    for (size_t q = 0; q < norms.size(); ++q) norms[q] += partial[size_t(b) * norms.size() + q];
  return norms;
}

void sparse_merge(void* out, const TaskSource& s, const std::vector<KeepRule>& rules, const SparseMergeOptions& o,
                  int threads) {
  const int n_models = static_cast<int>(s.xs.size());
  parallel_pieces(s.numel, plan_threads(s.numel, threads), [&](int, int64_t begin, int64_t end) {
    std::vector<float> kept(n_models), votes(n_models);
    for (int64_t j = begin; j < end; ++j) {
      const float b = s.base ? load_float(s.base, s.dtype, j) : 0.f;
      float tally = 0.f;
      for (int i = 0; i < n_models; ++i) {
        const float x = load_float(s.xs[i], s.dtype, j);
        const float tau = s.base ? x - b : x;
        const bool keep = keeps(rules[i], j, magnitude_key(s, i, j, tau));
        kept[i] = !keep ? 0.f : (o.divide ? tau / o.scales[i] : tau * o.scales[i]);
        votes[i] = o.elect_weighted ? kept[i] * o.weights[i] : kept[i];
        tally += o.consensus == 2 ? sign_of(votes[i]) : votes[i];
      }
      const float majority = tally >= 0.f ? 1.f : -1.f;
      float merged = 0.f, agreeing = 0.f, agreeing_weight = 0.f;
      for (int i = 0; i < n_models; ++i) {
        if (o.consensus != 0 && sign_of(votes[i]) != majority) continue;
        merged += kept[i] * o.weights[i];
        agreeing += 1.f;
        agreeing_weight += o.weights[i];
      }
      if (o.combine == 1) {
        merged /= std::max(agreeing, 1.f);
      } else if (o.combine == 2) {
        const float divisor = o.consensus != 0 ? agreeing_weight : o.weight_total;
        merged /= divisor == 0.f ? 1.f : divisor;
      }
      if (o.lam != 1.f) merged *= o.lam;
      store_float(out, s.dtype, j, s.base ? b + merged : merged);
    }
  });
}

}  // namespace fk
