// Drivers of the sparse kernels (portable translation units only: they use standard containers
// and dispatch to the active ISA's kernels in sparse_kernels.h).
// Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "sparse_args.h"

namespace fk {

// Where a model's task vector comes from: tau = x - base (in float32), or x itself.
struct TaskSource {
  int dtype = kFloat32;
  int64_t numel = 0;
  const void* base = nullptr;  // null: xs are task vectors
  std::vector<const void*> xs;

  TaskArgs args() const {
    TaskArgs a;
    a.numel = numel;
    a.n = static_cast<int>(xs.size());
    a.base = base;
    a.xs = xs.data();
    // Keys are the bit patterns of |tau|: 16-bit when tau is a 16-bit input itself, else float32's.
    a.keys16 = base == nullptr && (dtype == kFloat16 || dtype == kBFloat16);
    return a;
  }
};

// A TopK threshold as the int32 the kernels compare keys (< 2^31) with.
inline int32_t key_threshold(int64_t t) {
  return static_cast<int32_t>(t < -1 ? -1 : t > 0x7fffffff ? 0x7fffffff : t);
}

// One TopK per (model, k) query: the k largest |tau| of that model (ties: lowest index first).
std::vector<TopK> magnitude_select(const TaskSource& s, const std::vector<int>& models,
                                   const std::vector<int64_t>& ks, int threads);

// Per model: (sum |tau|, sum over kept of |tau|), summed in fixed blocks so threads do not matter.
std::vector<double> kept_l1_norms(const TaskSource& s, const std::vector<KeepRule>& rules, int threads);

struct SparseMergeOptions {
  std::vector<float> weights, scales;  // kept values are multiplied (or divided) by scale: the rescale
  bool divide = false;                 // divide: x / density exactly as the reference rounds it
  int consensus = 0;                   // 0 none, 1 sum, 2 count
  bool elect_weighted = true;
  int combine = 0;                     // 0 sum, 1 mean_count, 2 mean_weight
  float weight_total = 0.f;            // combine = mean_weight without consensus: sum of weights
  float lam = 1.f;
};

void sparse_merge(void* out, const TaskSource& s, const std::vector<KeepRule>& rules, const SparseMergeOptions& o,
                  int threads);

}  // namespace fk
