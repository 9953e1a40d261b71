// AVX2 + FMA + F16C lane: 8 float32 values per register. Only for *_avx2.cpp translation units.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "lanes_avx2.h needs -mavx2 -mfma -mf16c (see setup.py ISA_FLAGS)"
#endif
#include <immintrin.h>

#include "common.h"

namespace fk {
namespace {

struct Avx2Lane {
  using R = __m256;
  using Elem = float;
  static constexpr int width = 8;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load(const bf16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(f16* p, R v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Same rounding as float_to_bf16: add 0x7FFF + lsb, keep the high half; NaN -> 0x7FC0.
  static void store(bf16* p, R v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static R set1(Elem x) { return _mm256_set1_ps(x); }
  static R zero() { return _mm256_setzero_ps(); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R select_nonzero(R cond, R a, R b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(cond, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }
};

}  // namespace
}  // namespace fk
