// Portable "lanes": the arithmetic a kernel body is written against. A lane loads from any
// storage type into its register type, computes in float32 (float64 for float64 data) and
// stores back with exact rounding. Kernel bodies are templates over lanes, so one body serves
// every ISA; lanes live in an anonymous namespace so each ISA's instantiations stay separate.
#pragma once
#include "common.h"

namespace fk {
namespace {

// Arithmetic shared by the one-element lanes, in float (ScalarLane) or double (DoubleLane).
template <class F>
struct OneElementLane {
  using R = F;
  using Elem = F;
  static constexpr int width = 1;
  static R set1(Elem x) { return x; }
  static R zero() { return R(0); }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R select_nonzero(R cond, R a, R b) { return cond != R(0) ? a : b; }
};

struct ScalarLane : OneElementLane<float> {
  static R load(const float* p) { return *p; }
  static R load(const f16* p) { return f16_to_float(p->bits); }
  static R load(const bf16* p) { return bf16_to_float(p->bits); }
  static void store(float* p, R v) { *p = v; }
  static void store(f16* p, R v) { p->bits = float_to_f16(v); }
  static void store(bf16* p, R v) { p->bits = float_to_bf16(v); }
#ifdef __FMA__  // the tail of a vector loop must round exactly like its body
  static R fma(R a, R b, R c) { return __builtin_fmaf(a, b, c); }
#endif
};

struct DoubleLane : OneElementLane<double> {
  static R load(const double* p) { return *p; }
  static void store(double* p, R v) { *p = v; }
};

template <class Elem> const Elem* weights(const MergeArgs& a);
template <> inline const float* weights<float>(const MergeArgs& a) { return a.w32; }
template <> inline const double* weights<double>(const MergeArgs& a) { return a.w64; }
template <class Elem> const Elem* average_weights(const MergeArgs& a);
template <> inline const float* average_weights<float>(const MergeArgs& a) { return a.wavg32; }
template <> inline const double* average_weights<double>(const MergeArgs& a) { return a.wavg64; }
template <class Elem> Elem eps(const MergeArgs& a);
template <> inline float eps<float>(const MergeArgs& a) { return a.eps32; }
template <> inline double eps<double>(const MergeArgs& a) { return a.eps64; }

// Runs step(V{}, i) over full vectors of [begin, end), then step(S{}, i) over the tail.
template <class V, class S, class Step>
inline void for_each_lane(int64_t begin, int64_t end, Step&& step) {
  int64_t i = begin;
  for (; i + 2 * V::width <= end; i += 2 * V::width) {
    step(V{}, i);
    step(V{}, i + V::width);
  }
  for (; i + V::width <= end; i += V::width) step(V{}, i);
  for (; i < end; ++i) step(S{}, i);
}

}  // namespace
}  // namespace fk
