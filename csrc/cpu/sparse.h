// Shared by the sparse kernels: magnitude keys, the counter-based hash and per-model keep rules.
// Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace fk {

// Where a model's task vector comes from: tau = x - base (in float32), or x itself.
struct TaskSource {
  int dtype = kFloat32;
  int64_t numel = 0;
  const void* base = nullptr;  // null: xs are task vectors
  std::vector<const void*> xs;
  // Keys are the bit patterns of |tau|: 16-bit when tau is a 16-bit input itself, else float32's.
  bool key16() const { return base == nullptr && (dtype == kFloat16 || dtype == kBFloat16); }
};

// The top-k set {key > t} ∪ {key == t and index < cut}; t = 2^32 encodes the empty set.
struct TopK {
  int64_t t = int64_t(1) << 32;
  int64_t cut = 0;
  bool contains(uint32_t key, int64_t j) const { return key > t || (key == t && j < cut); }
};

enum KeepMode : int { kKeepAll = 0, kKeepTopK = 1, kKeepRandom = 2, kKeepMask = 3 };

// Model i keeps element j iff: all | in hi and not in lo | hash < p24 | mask[j].
struct KeepRule {
  int mode = kKeepAll;
  TopK hi, lo;
  uint32_t s1 = 0, s2 = 0, p24 = 0;
  const uint8_t* mask = nullptr;
};

namespace {

inline float load_float(const void* p, int dtype, int64_t j) {
  switch (dtype) {
    case kFloat16: return f16_to_float(static_cast<const uint16_t*>(p)[j]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[j]);
    default: return static_cast<const float*>(p)[j];
  }
}

// tau of model i at j, in float32.
inline float task_value(const TaskSource& s, int i, int64_t j) {
  const float x = load_float(s.xs[i], s.dtype, j);
  return s.base ? x - load_float(s.base, s.dtype, j) : x;
}

inline uint32_t magnitude_key(const TaskSource& s, int i, int64_t j, float tau) {
  if (s.key16()) return static_cast<const uint16_t*>(s.xs[i])[j] & 0x7fffu;
  return float_to_bits(tau) & 0x7fffffffu;
}

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

inline bool keeps(const KeepRule& r, int64_t j, uint32_t key) {
  switch (r.mode) {
    case kKeepTopK: return r.hi.contains(key, j) && !r.lo.contains(key, j);
    case kKeepRandom: {
      const uint32_t h = mix32(mix32(uint32_t(j) ^ r.s1) ^ uint32_t(uint64_t(j) >> 32) ^ r.s2);
      return (h >> 8) < r.p24;
    }
    case kKeepMask: return r.mask[j] != 0;
    default: return true;
  }
}

}  // namespace

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
