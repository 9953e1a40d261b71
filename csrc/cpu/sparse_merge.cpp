// The sparse merge of one tensor from its typed description (SparseMergeSpec): keep sets, rescale
// factors and the fused merge, split over threads; the element loops are the active ISA's
// (sparse_kernels.h). Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "della.h"
#include "runtime.h"
#include "sparse.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int64_t kNormBlock = int64_t(1) << 16;

uint32_t mix(uint32_t x) { return uint32_t(mix32<ScalarLane>(static_cast<int32_t>(x))); }

// The two per-model keys of the hash (reference/random_mask.py stream_keys).
std::pair<uint32_t, uint32_t> stream_keys(uint64_t seed, int model) {
  const uint32_t m = mix(uint32_t(model) * 0x9E3779B9u + 0x632BE5ABu);
  return {mix(uint32_t(seed) ^ m), mix(uint32_t(seed >> 32) ^ mix(m ^ 0x5BD1E995u))};
}

// DARE's keep threshold on 16-bit draws (reference/random_mask.py keep_threshold).
int32_t keep_threshold(double p) {
  return static_cast<int32_t>(std::min<double>(65536.0, std::max(0.0, std::trunc(p * 65536.0))));
}

// Per model: (sum |tau|, sum over kept of |tau|), summed in fixed blocks so threads do not matter.
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

// DELLA's keep masks of the models that ask for them, one numel-long run each in `storage`. With
// l1 rescaling, l1 gets each such model's (sum |tau|, sum of kept |tau|), summed as the masks are
// made (by row, in row order: the same sums for any thread count).
void della_keep(const TaskSource& s, int64_t rows, int64_t cols, const SparseMergeSpec& spec,
                std::vector<KeepRule>& rules, std::unique_ptr<uint8_t[]>& storage, std::vector<double>& l1, int threads) {
  TaskSource della = s;
  della.xs.clear();
  DellaArgs a;
  a.rows = rows;
  a.cols = cols;
  std::vector<int> models;
  for (size_t i = 0; i < spec.models.size(); ++i) {
    const ModelKeep& m = spec.models[i];
    if (m.kind != KeepKind::kDella) continue;
    const auto [s1, s2] = stream_keys(spec.seed, spec.first_model + static_cast<int>(i));
    della.xs.push_back(s.xs[i]);
    a.low.push_back(static_cast<float>(m.density - m.epsilon));
    a.spread.push_back(static_cast<float>(2 * m.epsilon));
    a.s1.push_back(s1);
    a.s2.push_back(s2);
    models.push_back(static_cast<int>(i));
  }
  if (models.empty()) return;
  storage.reset(new uint8_t[models.size() * size_t(s.numel)]);  // uninitialised: della_masks writes every byte
  std::vector<double> row_sums(spec.rescale == Rescale::kL1 ? models.size() * size_t(rows) * 2 : 0, 0.0);
  a.l1 = row_sums.empty() ? nullptr : row_sums.data();
  della_masks(della, a, storage.get(), threads);
  if (a.l1) l1.assign(spec.models.size() * 2, 0.0);
  for (size_t k = 0; k < models.size(); ++k) {
    rules[size_t(models[k])].mode = kKeepMask;
    rules[size_t(models[k])].mask = storage.get() + k * size_t(s.numel);
    for (int64_t r = 0; a.l1 && r < rows; ++r)
      for (int q = 0; q < 2; ++q) l1[size_t(models[k]) * 2 + q] += row_sums[(k * size_t(rows) + size_t(r)) * 2 + q];
  }
}

// The top-k sets of the magnitude rules: {drop + keep largest} minus {drop largest} per model.
void magnitude_keep(const TaskSource& s, const SparseMergeSpec& spec, std::vector<KeepRule>& rules, int threads) {
  std::vector<int> models, queried;
  std::vector<int64_t> ks;
  std::vector<bool> band;
  for (size_t i = 0; i < spec.models.size(); ++i) {
    const ModelKeep& m = spec.models[i];
    if (m.kind != KeepKind::kMagnitude && m.kind != KeepKind::kMagnitudeOutliers) continue;
    const double n = static_cast<double>(s.numel);
    const int64_t keep = m.keep >= 0 ? m.keep : static_cast<int64_t>(m.density * n);
    const int64_t drop =
        m.kind == KeepKind::kMagnitudeOutliers ? std::min(static_cast<int64_t>(m.gamma * n), s.numel - keep) : 0;
    models.push_back(static_cast<int>(i));
    ks.push_back(drop + keep);
    if (drop > 0) {  // no drop: lo stays the empty set (TopK's default), as a k = 0 query answers
      models.push_back(static_cast<int>(i));
      ks.push_back(drop);
    }
    band.push_back(drop > 0);
    queried.push_back(static_cast<int>(i));
  }
  if (models.empty()) return;
  const std::vector<TopK> found = magnitude_select(s, models, ks, threads);
  size_t q = 0;
  for (size_t k = 0; k < queried.size(); ++k) {
    KeepRule& r = rules[size_t(queried[k])];
    r.mode = kKeepTopK;
    r.hi = found[q++];
    if (band[k]) r.lo = found[q++];
    r.hi_key = key_threshold(r.hi.t);
    r.lo_key = key_threshold(r.lo.t);
    const bool lo_empty = r.lo.t > 0x7fffffff || (r.lo.t == 0x7fffffff && r.lo.cut <= 0);
    if (!lo_empty) r.mode = kKeepBand;
  }
}

std::vector<KeepRule> keep_rules(const TaskSource& s, int64_t rows, int64_t cols, const SparseMergeSpec& spec,
                                 std::unique_ptr<uint8_t[]>& della_storage, std::vector<double>& della_l1, int threads) {
  std::vector<KeepRule> rules(spec.models.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    const ModelKeep& m = spec.models[i];
    KeepRule& r = rules[i];
    if (m.kind == KeepKind::kAll) {
      r.hi.t = -1;  // every key is > -1
      r.hi_key = key_threshold(r.hi.t);
    } else if (m.kind == KeepKind::kRandom) {
      r.p16 = keep_threshold(m.density);
      std::tie(r.s1, r.s2) = stream_keys(spec.seed, spec.first_model + static_cast<int>(i));
      r.key0 = r.s1 ^ mix(r.s2);
      r.mode = r.p16 == (1 << 16) ? kKeepAll : kKeepRandom;
    } else if (m.kind == KeepKind::kThreshold) {  // key >= threshold: key > threshold - 1, no index cut
      r.mode = kKeepTopK;
      r.hi.t = m.threshold_key - 1;
      r.hi.cut = 0;
      r.hi_key = key_threshold(r.hi.t);
    } else if (m.kind == KeepKind::kMask) {
      if (m.mask == 0) throw std::invalid_argument("sparse_merge: a mask rule without a mask");
      r.mode = kKeepMask;
      r.mask = reinterpret_cast<const uint8_t*>(m.mask);
    }
  }
  magnitude_keep(s, spec, rules, threads);
  della_keep(s, rows, cols, spec, rules, della_storage, della_l1, threads);
  return rules;
}

}  // namespace

void sparse_merge(void* out, const TaskSource& s, int64_t rows, int64_t cols, const SparseMergeSpec& spec,
                  int threads) {
  const size_t n = s.xs.size();
  if (spec.models.size() != n || spec.weights.size() != n)
    throw std::invalid_argument("sparse_merge: one keep rule and one weight per input is required");
  if (rows < 0 || cols < 0 || rows * cols != s.numel)
    throw std::invalid_argument("sparse_merge: rows * cols must equal numel");
  std::unique_ptr<uint8_t[]> della_storage;
  std::vector<double> della_l1;
  const std::vector<KeepRule> rules = keep_rules(s, rows, cols, spec, della_storage, della_l1, threads);
  std::vector<float> scales(n, 1.f);
  bool divide = false;
  if (spec.rescale == Rescale::kInverseDensity) {
    for (size_t i = 0; i < n; ++i) {
      if (spec.models[i].kind == KeepKind::kAll) continue;  // nothing dropped: nothing to rescale
      scales[i] = static_cast<float>(spec.models[i].density);
      divide = true;
    }
  } else if (spec.rescale == Rescale::kL1) {
    const bool all_della = std::all_of(spec.models.begin(), spec.models.end(),
                                       [](const ModelKeep& m) { return m.kind == KeepKind::kDella; });
    const std::vector<double> norms = all_della ? della_l1 : kept_l1_norms(s, rules, threads);
    for (size_t i = 0; i < n; ++i) {
      const double before = norms[2 * i], after = norms[2 * i + 1];
      if (before >= kL1RescaleEps && after >= kL1RescaleEps) scales[i] = static_cast<float>(before / after);
    }
  }
  std::vector<float> weights(spec.weights.begin(), spec.weights.end());
  double total = 0.0;
  for (double w : spec.weights) total += w;
  SparseMergeArgs a;
  a.task = s.args();
  a.out = out;
  a.rules = rules.data();
  a.weights = weights.data();
  a.scales = scales.data();
  a.divide = divide;
  a.consensus = spec.consensus;
  a.elect_weighted = spec.elect_weighted;
  a.combine = spec.combine;
  a.weight_total = static_cast<float>(std::abs(total) >= 1e-8 ? total : 1.0);
  a.lam = static_cast<float>(spec.lam);
  a.tie = spec.tie;
  const SparseMergeFn fn = active_kernels().sparse_merge[s.dtype];
  parallel_chunks(s.numel, plan_threads(s.numel, threads), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

}  // namespace fk
