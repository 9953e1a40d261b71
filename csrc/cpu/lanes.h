// Portable "lanes": the arithmetic a kernel body is written against. A lane loads from any
// storage type into its register type, computes in float32 (float64 for float64 data) and
// stores back with exact rounding. Kernel bodies are templates over lanes, so one body serves
// every ISA; lanes live in an anonymous namespace so each ISA's instantiations stay separate.
#pragma once
#include <cmath>

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
  // a·b + c rounded once on every build, FMA hardware or not (a float product is exact in double)
  static R fma_once(R a, R b, R c) {
    if constexpr (sizeof(F) == sizeof(double)) return std::fma(a, b, c);
    else return R(double(a) * double(b) + double(c));
  }
  static R select_nonzero(R cond, R a, R b) { return cond != R(0) ? a : b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static R min(R a, R b) { return a < b ? a : b; }  // as SSE's: b where either is NaN
  static F hsum(R v) { return v; }
  static F hmax(R v) { return v; }
  static R exp(R v) { return std::exp(v); }
  static R log(R v) { return std::log(v); }

  // Comparisons and masks: M holds one truth value per element.
  using M = bool;
  static M fgt(R a, R b) { return a > b; }
  static M fge(R a, R b) { return a >= b; }
  static M feq(R a, R b) { return a == b; }
  static M mall() { return true; }
  static M mand(M a, M b) { return a && b; }
  static M mor(M a, M b) { return a || b; }
  static M mandnot(M a, M b) { return a && !b; }
  static R select(M m, R a, R b) { return m ? a : b; }
  static R keep_if(M m, R a) { return m ? a : R(0); }
  static R one_if(M m) { return m ? R(1) : R(0); }
  static R abs(R v) { return std::fabs(v); }
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

  // Integer operations of the sparse kernels: I holds int32 keys or uint32 hash state (wrapping
  // arithmetic).
  using I = int32_t;
  static I iset1(int32_t v) { return v; }
  static I iota() { return 0; }
  static R to_float(I v) { return float(v); }
  static I trunc_to_int(R v) { return int32_t(v); }  // v within int32's range
  static I iadd(I a, I b) { return int32_t(uint32_t(a) + uint32_t(b)); }
  static I ixor(I a, I b) { return a ^ b; }
  static I ior(I a, I b) { return a | b; }
  static I imin(I a, I b) { return a < b ? a : b; }
  static I imax(I a, I b) { return a < b ? b : a; }
  static I iand(I a, I b) { return a & b; }
  static I imul(I a, I b) { return int32_t(uint32_t(a) * uint32_t(b)); }
  template <int k>
  static I isrl(I a) { return int32_t(uint32_t(a) >> k); }
  static M igt(I a, I b) { return a > b; }
  static M ieq(I a, I b) { return a == b; }
  static int movemask(M m) { return m ? 1 : 0; }
  static R abs(R v) { return bits_to_float(float_to_bits(v) & 0x7fffffffu); }
  static I abs_bits(R v) { return int32_t(float_to_bits(v) & 0x7fffffffu); }
  static I key16(const f16* p) { return p->bits & 0x7fff; }
  static I key16(const bf16* p) { return p->bits & 0x7fff; }
  static M load_mask8(const uint8_t* p) { return *p != 0; }
  static I load_i(const int32_t* p) { return *p; }
  static I gather(const int32_t* p, I at) { return p[at]; }
  static void store_i(int32_t* p, I v) { *p = v; }
  static void store_mask8(uint8_t* p, M m) { *p = m ? 1 : 0; }
  static int compress_store(int32_t* p, I v, M m) {  // always writes *p (no branch); counts it if m
    *p = v;
    return m ? 1 : 0;
  }
  static I count_if(I counts, M m) { return counts + (m ? 1 : 0); }
  static int64_t ihsum(I v) { return v; }
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

// Asks for the memory kPrefetchBytes past p now (vector lanes only: a scalar tail is at the end). A
// kernel's first pass over a mapped checkpoint reads it from memory, and the hardware prefetchers
// stop at each 4 KiB page: first passes call this for each input as they go (on the 2-core VM, 3 x
// 1.1B merges spent 3% (della) to 20% (nearswap) less time computing).
constexpr int64_t kPrefetchBytes = 4096;
template <class L, class T>
inline void prefetch_ahead(const T* p) {
  if constexpr (L::width > 1) __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

}  // namespace
}  // namespace fk
