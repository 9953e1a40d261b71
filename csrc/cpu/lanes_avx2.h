// AVX2 + FMA + F16C lane: 8 float32 values per register. Only for *_avx2.cpp translation units.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "lanes_avx2.h needs -mavx2 -mfma -mf16c (see setup.py ISA_FLAGS)"
#endif
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstring>

#include "common.h"
#include "lane_math.h"

namespace fk {
namespace {

// kCompressLanes[bits]: the positions of bits' set bits, lowest first, 3 bits each (compress_store).
constexpr auto kCompressLanes = [] {
  std::array<uint32_t, 256> table{};
  for (uint32_t bits = 0; bits < 256; ++bits)
    for (uint32_t lane = 0, n = 0; lane < 8; ++lane)
      if (bits >> lane & 1) table[bits] |= lane << (3 * n++);
  return table;
}();

// kMaskBytes[bits]: byte i is bit i of bits (store_mask8).
constexpr auto kMaskBytes = [] {
  std::array<uint64_t, 256> table{};
  for (uint32_t bits = 0; bits < 256; ++bits)
    for (uint32_t lane = 0; lane < 8; ++lane) table[bits] |= uint64_t(bits >> lane & 1) << (8 * lane);
  return table;
}();

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
  static R fma_once(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R select_nonzero(R cond, R a, R b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(cond, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }

  // Integer and mask operations (see ScalarLane): a mask is all-ones or all-zeros per lane.
  using I = __m256i;
  using M = __m256i;
  static I iset1(int32_t v) { return _mm256_set1_epi32(v); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  static I imin(I a, I b) { return _mm256_min_epi32(a, b); }
  static I imax(I a, I b) { return _mm256_max_epi32(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I imul(I a, I b) { return _mm256_mullo_epi32(a, b); }
  template <int k>
  static I isrl(I a) { return _mm256_srli_epi32(a, k); }
  static M igt(I a, I b) { return _mm256_cmpgt_epi32(a, b); }
  static M ieq(I a, I b) { return _mm256_cmpeq_epi32(a, b); }
  static M fgt(R a, R b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static M fge(R a, R b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
  static M feq(R a, R b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
  static M mall() { return _mm256_set1_epi32(-1); }
  static M mand(M a, M b) { return _mm256_and_si256(a, b); }
  static M mor(M a, M b) { return _mm256_or_si256(a, b); }
  static M mandnot(M a, M b) { return _mm256_andnot_si256(b, a); }
  static int movemask(M m) { return _mm256_movemask_ps(_mm256_castsi256_ps(m)); }
  static R select(M m, R a, R b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
  static R keep_if(M m, R a) { return _mm256_and_ps(_mm256_castsi256_ps(m), a); }  // a, or +0
  static R one_if(M m) { return _mm256_and_ps(_mm256_castsi256_ps(m), _mm256_set1_ps(1.f)); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(R v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static R exp(R x) { return lane_exp<Avx2Lane>(x); }
  static R log(R x) { return lane_log<Avx2Lane>(x); }
  // What lane_math.h builds exp and log from.
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R round(R v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static I to_int(R v) { return _mm256_cvtps_epi32(v); }
  static R to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static I trunc_to_int(R v) { return _mm256_cvttps_epi32(v); }
  static I to_bits(R v) { return _mm256_castps_si256(v); }
  static R from_bits(I v) { return _mm256_castsi256_ps(v); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  template <int k>
  static I isra(I a) { return _mm256_srai_epi32(a, k); }
  template <int k>
  static I isll(I a) { return _mm256_slli_epi32(a, k); }
  static I ione_if(M m) { return _mm256_and_si256(m, _mm256_set1_epi32(1)); }
  static R abs(R v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static I abs_bits(R v) { return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)); }
  static I key16(const f16* p) { return key16_bits(p); }
  static I key16(const bf16* p) { return key16_bits(p); }
  static M load_mask8(const uint8_t* p) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cmpgt_epi32(bytes, _mm256_setzero_si256());
  }
  static I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I gather(const int32_t* p, I at) { return _mm256_i32gather_epi32(p, at, 4); }
  static void store_i(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  // 1 or 0 per lane of m as 8 bytes at p.
  static void store_mask8(uint8_t* p, M m) { std::memcpy(p, &kMaskBytes[movemask(m)], 8); }
  // The lanes of v where m is set, in lane order, stored from p on (all 8 lanes are written: p
  // needs room for 8); returns how many.
  static int compress_store(int32_t* p, I v, M m) {
    const int bits = movemask(m);
    const __m256i lanes = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(int32_t(kCompressLanes[bits])), _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
        _mm256_set1_epi32(7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permutevar8x32_epi32(v, lanes));
    return __builtin_popcount(unsigned(bits));
  }
  static I count_if(I counts, M m) { return _mm256_sub_epi32(counts, m); }  // a true lane is -1
  static int64_t ihsum(I v) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    int64_t sum = 0;
    for (int32_t x : lanes) sum += x;
    return sum;
  }

 private:
  static I key16_bits(const void* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_and_si256(wide, _mm256_set1_epi32(0x7fff));
  }
};

}  // namespace
}  // namespace fk
