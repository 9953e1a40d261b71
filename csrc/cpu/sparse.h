// Shared by the sparse kernels: magnitude keys, the counter-based hash and per-model keep rules.
// Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "lanes.h"

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

// A TaskSource with its storage type T and key width fixed at compile time, so the hot loops
// carry no per-element dtype switch. Keys16: keys are T's own 16-bit magnitude bits.
template <class T, bool Keys16>
struct TypedSource {
  const T* base;
  std::vector<const T*> xs;

  explicit TypedSource(const TaskSource& s) : base(static_cast<const T*>(s.base)) {
    for (const void* p : s.xs) xs.push_back(static_cast<const T*>(p));
  }
  float value(int i, int64_t j) const {
    const float x = ScalarLane::load(xs[i] + j);
    return base ? x - ScalarLane::load(base + j) : x;
  }
  uint32_t key(int i, int64_t j, float tau) const {
    if constexpr (Keys16) return reinterpret_cast<const uint16_t*>(xs[i])[j] & 0x7fffu;
    return float_to_bits(tau) & 0x7fffffffu;
  }
};

// Calls f(typed_view) with the TypedSource matching s (float32, float16 or bfloat16 storage).
template <class F>
void with_typed(const TaskSource& s, F&& f) {
  switch (s.dtype) {
    case kFloat16:
      if (s.key16()) return f(TypedSource<f16, true>(s));
      return f(TypedSource<f16, false>(s));
    case kBFloat16:
      if (s.key16()) return f(TypedSource<bf16, true>(s));
      return f(TypedSource<bf16, false>(s));
    default:
      return f(TypedSource<float, false>(s));
  }
}

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

constexpr int kBlock = 256;  // elements per block in the sparse kernels' inner loops

// keep[j] for j in [0, m) of the block starting at j0, given the block's keys (top-k modes) and
// element values. Branches once per block, not per element, so the loops vectorise.
inline void keep_block(const KeepRule& r, int64_t j0, int m, const uint32_t* keys, uint8_t* keep) {
  switch (r.mode) {
    case kKeepTopK: {
      const bool no_ties_here = r.hi.cut <= j0 || r.hi.cut >= j0 + m;
      if (no_ties_here && r.lo.t > 0x7fffffff && r.hi.t >= 0 && r.hi.t <= 0x7fffffff) {
        const uint32_t t = uint32_t(r.hi.t);
        if (r.hi.cut >= j0 + m) {
          for (int j = 0; j < m; ++j) keep[j] = keys[j] >= t;
        } else {
          for (int j = 0; j < m; ++j) keep[j] = keys[j] > t;
        }
      } else {
        for (int j = 0; j < m; ++j) keep[j] = r.hi.contains(keys[j], j0 + j) && !r.lo.contains(keys[j], j0 + j);
      }
      break;
    }
    case kKeepRandom: {
      const uint32_t hi = uint32_t(uint64_t(j0) >> 32), lo0 = uint32_t(j0);
      for (int j = 0; j < m; ++j) {  // a block never crosses a 2^32 boundary (see sparse_merge.cpp)
        const uint32_t h = mix32(mix32((lo0 + uint32_t(j)) ^ r.s1) ^ hi ^ r.s2);
        keep[j] = (h >> 8) < r.p24;
      }
      break;
    }
    case kKeepMask:
      for (int j = 0; j < m; ++j) keep[j] = r.mask[j0 + j] != 0;
      break;
    default:
      for (int j = 0; j < m; ++j) keep[j] = 1;
  }
}

// tau[j] and keys[j] of model i over one block; b holds the block's base values (0 without base).
template <class V>
inline void task_block(const V& v, int i, int64_t j0, int m, const float* b, float* tau, uint32_t* keys) {
  const auto* x = v.xs[i] + j0;
  for (int j = 0; j < m; ++j) tau[j] = ScalarLane::load(x + j) - b[j];
  for (int j = 0; j < m; ++j) keys[j] = v.key(i, j0 + j, tau[j]);
}

template <class V>
inline void base_block(const V& v, int64_t j0, int m, float* b) {
  for (int j = 0; j < m; ++j) b[j] = v.base ? ScalarLane::load(v.base + j0 + j) : 0.f;
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
