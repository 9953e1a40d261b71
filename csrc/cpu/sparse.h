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

// How one model's task vector is sparsified: the typed keep rule the Python layer fills in (bound
// as fusion_kernels._C.ModelKeep). Semantics: keep_mask_and_probability in
// fusion_kernels/reference/sparse_merge.py.
enum class KeepKind : int { kAll, kMagnitude, kMagnitudeOutliers, kRandom, kDella, kMask, kThreshold };

struct ModelKeep {
  KeepKind kind = KeepKind::kAll;
  double density = 1.0;  // kept fraction: top-k size floor(density·numel), DARE's keep probability, DELLA's mean
  double gamma = 0.0;    // kMagnitudeOutliers: fraction of the largest |tau| dropped before the top-k
  double epsilon = 0.0;  // kDella: keep probabilities spread over density ± epsilon along each row
  int64_t keep = -1;     // an exact top-k size instead of floor(density·numel) (magnitude_prune); -1: none
  uintptr_t mask = 0;    // kMask: the address of a bool tensor shaped like the inputs
  int64_t threshold_key = 0;  // kThreshold: keep |tau| keys >= this one (the caller rounds it up into the key space)
};

enum class Rescale : int { kNone, kInverseDensity, kL1 };

// Everything about one sparse merge but the tensors. consensus: 0 none, 1 sum, 2 count;
// combine: 0 sum, 1 mean_count, 2 mean_weight, 3 max (the codes of SparseMergeArgs).
struct SparseMergeSpec {
  std::vector<ModelKeep> models;
  std::vector<double> weights;
  Rescale rescale = Rescale::kNone;
  int consensus = 0;
  bool elect_weighted = true;
  int combine = 0;
  double lam = 1.0;
  int tie = 1;  // elected where the tally is 0: + (mergekit, PEFT), - or no one (FusionBench's majority)
  uint64_t seed = 0;  // DARE's and DELLA's draws (reference/random_mask.py's stream_keys)
  int first_model = 0;  // the stream of input i is model first_model + i's
};

// mergekit's L1 rescale leaves a model alone when either norm is below this (reference.sparse_merge.L1_RESCALE_EPS).
constexpr double kL1RescaleEps = 1e-7;

// The whole sparse merge of one tensor, viewed as [rows, cols] (DELLA ranks along rows): each
// model's keep set (DELLA masks, top-k selection, DARE draws or the caller's masks), the rescale
// (kept-L1 sums when asked), sign election and the fused merge, in one call.
void sparse_merge(void* out, const TaskSource& s, int64_t rows, int64_t cols, const SparseMergeSpec& spec,
                  int threads);

}  // namespace fk
