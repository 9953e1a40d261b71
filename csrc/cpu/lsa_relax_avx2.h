// AVX2 version of lsa_relax_scalar (lsa_relax.h): 4 columns per step, the same results.
#pragma once
#include <immintrin.h>

#include "lsa_relax.h"

namespace fk {
namespace {

inline int64_t lsa_relax_avx2(const double* ci, const double* v, const double* blocked, double base, double* shortest,
                              int64_t* path, int64_t row, int64_t m, double* lowest) {
  const __m256d vbase = _mm256_set1_pd(base);
  const __m256i vrow = _mm256_set1_epi64x(row);
  __m256d low = _mm256_set1_pd(__builtin_inf());
  __m256i best = _mm256_set1_epi64x(-1), idx = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i four = _mm256_set1_epi64x(4);
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const __m256d blk = _mm256_loadu_pd(blocked + j);
    const __m256d r = _mm256_add_pd(_mm256_sub_pd(_mm256_add_pd(vbase, _mm256_loadu_pd(ci + j)), _mm256_loadu_pd(v + j)), blk);
    __m256d s = _mm256_loadu_pd(shortest + j);
    const __m256d upd = _mm256_cmp_pd(r, s, _CMP_LT_OQ);
    s = _mm256_blendv_pd(s, r, upd);
    _mm256_storeu_pd(shortest + j, s);
    __m256i* pp = reinterpret_cast<__m256i*>(path + j);
    _mm256_storeu_si256(pp, _mm256_blendv_epi8(_mm256_loadu_si256(pp), vrow, _mm256_castpd_si256(upd)));
    const __m256d key = _mm256_add_pd(s, blk);
    const __m256d better = _mm256_cmp_pd(key, low, _CMP_LT_OQ);  // strict: each lane keeps its first minimum
    low = _mm256_blendv_pd(low, key, better);
    best = _mm256_blendv_epi8(best, idx, _mm256_castpd_si256(better));
    idx = _mm256_add_epi64(idx, four);
  }
  alignas(32) double lows[4];
  alignas(32) int64_t bests[4];
  _mm256_store_pd(lows, low);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bests), best);
  double lo = __builtin_inf();
  int64_t pick = -1;
  for (int k = 0; k < 4; ++k)
    if (bests[k] >= 0 && (lows[k] < lo || (lows[k] == lo && bests[k] < pick))) lo = lows[k], pick = bests[k];
  double tail_low;  // the last m % 4 columns; on equal keys the lower index (the vector part's) stays
  const int64_t tail = lsa_relax_scalar(ci + j, v + j, blocked + j, base, shortest + j, path + j, row, m - j, &tail_low);
  if (tail >= 0 && tail_low < lo) lo = tail_low, pick = j + tail;
  *lowest = lo;
  return pick;
}

}  // namespace
}  // namespace fk
