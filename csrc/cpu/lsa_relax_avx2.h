// AVX2 versions of the solver's row scans (lsa_relax.h), the same results. Each keeps two sets of
// 4-lane accumulators (alternate blocks of 4 columns): one set's compare-and-blend chain is
// latency bound, two run side by side. Each lane sees its columns in index order, so its minima
// keep their first index, and merging every lane's in (value, index) order gives the scalar result.
#pragma once
#include <immintrin.h>

#include "lsa_relax.h"

namespace fk {
namespace {

inline __m256d lsa_load4(const double* p) { return _mm256_loadu_pd(p); }
inline __m256d lsa_load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

template <class T>
inline int64_t lsa_relax_avx2(const T* ci, double sign, const double* v, double base, double* shortest, int32_t* path,
                              int32_t row, int64_t m, double* lowest) {
  const __m256d vbase = _mm256_set1_pd(base), vsign = _mm256_set1_pd(sign);
  const __m128i vrow = _mm_set1_epi32(row);
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);  // a 64-bit mask's lanes as 32-bit ones
  const __m256i eight = _mm256_set1_epi64x(8);
  __m256d low[2] = {_mm256_set1_pd(__builtin_inf()), _mm256_set1_pd(__builtin_inf())};
  __m256i best[2] = {_mm256_set1_epi64x(-1), _mm256_set1_epi64x(-1)};
  __m256i idx[2] = {_mm256_setr_epi64x(0, 1, 2, 3), _mm256_setr_epi64x(4, 5, 6, 7)};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    for (int h = 0; h < 2; ++h) {
      const int64_t k = j + 4 * h;
      const __m256d cost = _mm256_mul_pd(vsign, lsa_load4(ci + k));
      const __m256d r = _mm256_sub_pd(_mm256_add_pd(vbase, cost), _mm256_loadu_pd(v + k));
      __m256d s = _mm256_loadu_pd(shortest + k);
      const __m256d upd = _mm256_cmp_pd(r, s, _CMP_LT_OQ);
      if (_mm256_movemask_pd(upd)) {  // late in a search most columns keep theirs: no store, no dirty line
        s = _mm256_blendv_pd(s, r, upd);
        _mm256_storeu_pd(shortest + k, s);
        __m128i* pp = reinterpret_cast<__m128i*>(path + k);
        const __m128i upd32 =
            _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(upd), low_halves));
        _mm_storeu_si128(pp, _mm_blendv_epi8(_mm_loadu_si128(pp), vrow, upd32));
      }
      const __m256d better = _mm256_cmp_pd(s, low[h], _CMP_LT_OQ);  // strict: a lane keeps its first minimum
      if (_mm256_movemask_pd(better)) {  // rare after the first columns: skip the blends
        low[h] = _mm256_blendv_pd(low[h], s, better);
        best[h] = _mm256_blendv_epi8(best[h], idx[h], _mm256_castpd_si256(better));
      }
      idx[h] = _mm256_add_epi64(idx[h], eight);
    }
  }
  alignas(32) double lows[8];
  alignas(32) int64_t bests[8];
  for (int h = 0; h < 2; ++h) {
    _mm256_store_pd(lows + 4 * h, low[h]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bests + 4 * h), best[h]);
  }
  double lo = __builtin_inf();
  int64_t pick = -1;
  for (int k = 0; k < 8; ++k)
    if (bests[k] >= 0 && (lows[k] < lo || (lows[k] == lo && bests[k] < pick))) lo = lows[k], pick = bests[k];
  double tail_low;  // the last m % 8 columns; on equal keys the lower index (the vector part's) stays
  const int64_t tail = lsa_relax_scalar(ci + j, sign, v + j, base, shortest + j, path + j, row, m - j, &tail_low);
  if (tail >= 0 && tail_low < lo) lo = tail_low, pick = j + tail;
  *lowest = lo;
  return pick;
}

template <class T>
inline void lsa_top2_avx2(const T* ci, double sign, const double* v, int64_t m, LsaTop2* top) {
  const __m256d vsign = _mm256_set1_pd(sign), inf = _mm256_set1_pd(__builtin_inf());
  const __m256i none = _mm256_set1_epi64x(-1), eight = _mm256_set1_epi64x(8);
  __m256d low[2] = {inf, inf}, second[2] = {inf, inf};
  __m256i at[2] = {none, none}, second_at[2] = {none, none};
  __m256i idx[2] = {_mm256_setr_epi64x(0, 1, 2, 3), _mm256_setr_epi64x(4, 5, 6, 7)};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    for (int h = 0; h < 2; ++h) {  // per lane, the scalar loop's two places (strict <)
      const __m256d r = _mm256_sub_pd(_mm256_mul_pd(vsign, lsa_load4(ci + j + 4 * h)), _mm256_loadu_pd(v + j + 4 * h));
      const __m256d next = _mm256_cmp_pd(r, second[h], _CMP_LT_OQ);
      if (_mm256_movemask_pd(next)) {  // rare after the first columns: skip the blends (r < low implies r < second)
        const __m256d first = _mm256_cmp_pd(r, low[h], _CMP_LT_OQ);
        second[h] = _mm256_blendv_pd(_mm256_blendv_pd(second[h], r, next), low[h], first);
        second_at[h] = _mm256_blendv_epi8(_mm256_blendv_epi8(second_at[h], idx[h], _mm256_castpd_si256(next)), at[h],
                                          _mm256_castpd_si256(first));
        low[h] = _mm256_blendv_pd(low[h], r, first);
        at[h] = _mm256_blendv_epi8(at[h], idx[h], _mm256_castpd_si256(first));
      }
      idx[h] = _mm256_add_epi64(idx[h], eight);
    }
  }
  alignas(32) double lows[8], seconds[8];
  alignas(32) int64_t ats[8], second_ats[8];
  for (int h = 0; h < 2; ++h) {
    _mm256_store_pd(lows + 4 * h, low[h]);
    _mm256_store_pd(seconds + 4 * h, second[h]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ats + 4 * h), at[h]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(second_ats + 4 * h), second_at[h]);
  }
  LsaTop2 tail;
  lsa_top2_scalar(ci + j, sign, v + j, m - j, &tail);
  *top = {__builtin_inf(), __builtin_inf(), -1, -1};
  for (int k = 0; k < 8; ++k) {
    lsa_top2_add(top, lows[k], ats[k]);
    lsa_top2_add(top, seconds[k], second_ats[k]);
  }
  lsa_top2_add(top, tail.low, tail.at < 0 ? -1 : j + tail.at);
  lsa_top2_add(top, tail.second, tail.second_at < 0 ? -1 : j + tail.second_at);
}

}  // namespace
}  // namespace fk
