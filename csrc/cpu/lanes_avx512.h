// AVX-512F lane: 16 float32 values per register, masks in mask registers. Only for *_avx512.cpp
// translation units. The same results as Avx2Lane element by element (loads, stores and their
// roundings, exp and log from lane_math.h); only the horizontal sums' order differs.
#pragma once
#if !defined(__AVX512F__)
#error "lanes_avx512.h needs -mavx512f (see setup.py ISA_FLAGS)"
#endif
#include <immintrin.h>

#include <cmath>

#include "common.h"
#include "lanes_avx2.h"
#include "lane_math.h"

namespace fk {
namespace {

struct Avx512Lane {
  using R = __m512;
  using Elem = float;
  static constexpr int width = 16;
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const bf16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(f16* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Same rounding as float_to_bf16: add 0x7FFF + lsb, keep the high half; NaN -> 0x7FC0.
  static void store(bf16* p, R v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static R set1(Elem x) { return _mm512_set1_ps(x); }
  static R zero() { return _mm512_setzero_ps(); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fma_once(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R select_nonzero(R cond, R a, R b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(cond, _mm512_setzero_ps(), _CMP_NEQ_UQ), b, a);
  }

  // Integer and mask operations (see ScalarLane); a mask is one bit per lane.
  using I = __m512i;
  using M = __mmask16;
  static I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  static I imin(I a, I b) { return _mm512_min_epi32(a, b); }
  static I imax(I a, I b) { return _mm512_max_epi32(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I imul(I a, I b) { return _mm512_mullo_epi32(a, b); }
  template <int k>
  static I isrl(I a) { return _mm512_srli_epi32(a, k); }
  using Half = Avx2Lane;  // eight lanes: one hash serves a 16-element group of DARE's draws
  // Lanes 0-7: the low 16 bits of h's eight lanes, lanes 8-15: their high 16 bits.
  static I halves16(__m256i h) {
    const __m256i low = _mm256_and_si256(h, _mm256_set1_epi32(0xffff)), high = _mm256_srli_epi32(h, 16);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  }
  // The same layout from sixteen hashes h: the group of h's lanes 8·S .. 8·S+7.
  template <int S>
  static I halves16_of(I h) {
    const __m512i pick = S == 0 ? _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7)
                                : _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(pick, h), shift), _mm512_set1_epi32(0xffff));
  }
  static M igt(I a, I b) { return _mm512_cmpgt_epi32_mask(a, b); }
  static M ieq(I a, I b) { return _mm512_cmpeq_epi32_mask(a, b); }
  static M fgt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M fge(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M feq(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M mall() { return M(0xffff); }
  static M mand(M a, M b) { return M(a & b); }
  static M mor(M a, M b) { return M(a | b); }
  static M mandnot(M a, M b) { return M(a & ~b); }
  static int movemask(M m) { return int(m); }
  static R select(M m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }
  static R keep_if(M m, R a) { return _mm512_maskz_mov_ps(m, a); }  // a, or +0
  static R one_if(M m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.f)); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float hsum(R v) { return _mm512_reduce_add_ps(v); }
  static float hmax(R v) { return _mm512_reduce_max_ps(v); }
  static R exp(R x) { return lane_exp<Avx512Lane>(x); }
  static R log(R x) { return lane_log<Avx512Lane>(x); }
  // What lane_math.h builds exp and log from.
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R round(R v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static I to_int(R v) { return _mm512_cvtps_epi32(v); }
  static R to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I trunc_to_int(R v) { return _mm512_cvttps_epi32(v); }
  static I to_bits(R v) { return _mm512_castps_si512(v); }
  static R from_bits(I v) { return _mm512_castsi512_ps(v); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  template <int k>
  static I isra(I a) { return _mm512_srai_epi32(a, k); }
  template <int k>
  static I isll(I a) { return _mm512_slli_epi32(a, k); }
  static I ione_if(M m) { return _mm512_maskz_mov_epi32(m, _mm512_set1_epi32(1)); }
  static R abs(R v) { return _mm512_castsi512_ps(abs_bits(v)); }
  static I abs_bits(R v) { return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)); }
  static I key16(const f16* p) { return key16_bits(p); }
  static I key16(const bf16* p) { return key16_bits(p); }
  static M load_mask8(const uint8_t* p) {  // 16 bytes, one a lane
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_test_epi32_mask(bytes, bytes);
  }
  static I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I gather(const int32_t* p, I at) { return _mm512_i32gather_epi32(at, p, 4); }
  static void store_i(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  // 1 or 0 per lane of m as 16 bytes at p.
  static void store_mask8(uint8_t* p, M m) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, _mm512_set1_epi32(1))));
  }
  // The lanes of v where m is set, in lane order, stored from p on; returns how many. Writes all 16
  // lanes at p (the rest zeros): vpcompressd with a memory operand is microcoded on AMD's Zen 4
  // (one in hundreds of cycles); compressing in a register and storing whole is fast everywhere.
  static int compress_store(int32_t* p, I v, M m) {
    _mm512_storeu_si512(p, _mm512_maskz_compress_epi32(m, v));
    return __builtin_popcount(unsigned(m));
  }
  static I count_if(I counts, M m) { return _mm512_mask_add_epi32(counts, m, counts, _mm512_set1_epi32(1)); }
  static int64_t ihsum(I v) {
    alignas(64) int32_t lanes[16];
    _mm512_store_si512(lanes, v);
    int64_t sum = 0;
    for (int32_t x : lanes) sum += x;
    return sum;
  }

 private:
  static I key16_bits(const void* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_and_si512(wide, _mm512_set1_epi32(0x7fff));
  }
};

}  // namespace
}  // namespace fk
