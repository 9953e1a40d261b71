// AVX2 block of gram (gram_kernels.h) for up to three 16/32-bit inputs: each step loads eight
// elements of every input, converts them to float64 in registers and adds every pair's products
// to its accumulators: no float64 buffers. The same lanes and order of additions as
// gram_block_buffered, so the same results: without a base the products (of 24-bit significands)
// are exact in float64, so a fused multiply-add rounds as its multiply and add do; with one, the
// differences' products are not, and stay a separate multiply and add.
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "gram_kernels.h"
#include "lanes_avx2.h"

namespace fk {
namespace {

template <int N, bool kBase, class T>
void gram_block_fused(double* acc, const T* const* xs, const T* base, int64_t c0, int64_t c1) {
  constexpr int P = N * (N + 1) / 2;
  static_assert(kLanes == 8, "two float64 vectors of four lanes per pair");
  __m256d lo[P], hi[P];
  for (int p = 0; p < P; ++p) lo[p] = hi[p] = _mm256_setzero_pd();
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    if constexpr (kBase) prefetch_ahead<Avx2Lane>(base + c);
    for (int i = 0; i < N; ++i) prefetch_ahead<Avx2Lane>(xs[i] + c);
    __m256d dl[N], dh[N];
    __m256d bl = _mm256_setzero_pd(), bh = _mm256_setzero_pd();
    if constexpr (kBase) {
      const __m256 b = Avx2Lane::load(base + c);
      bl = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
      bh = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
    }
    for (int i = 0; i < N; ++i) {
      const __m256 x = Avx2Lane::load(xs[i] + c);
      dl[i] = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      dh[i] = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      if constexpr (kBase) {
        dl[i] = _mm256_sub_pd(dl[i], bl);
        dh[i] = _mm256_sub_pd(dh[i], bh);
      }
    }
    int p = 0;
    for (int i = 0; i < N; ++i) {
      for (int j = i; j < N; ++j, ++p) {
        if constexpr (kBase) {
          lo[p] = _mm256_add_pd(lo[p], _mm256_mul_pd(dl[i], dl[j]));
          hi[p] = _mm256_add_pd(hi[p], _mm256_mul_pd(dh[i], dh[j]));
        } else {  // a product of two float32 values is exact in float64: fused, it rounds the same
          lo[p] = _mm256_fmadd_pd(dl[i], dl[j], lo[p]);
          hi[p] = _mm256_fmadd_pd(dh[i], dh[j], hi[p]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_pd(acc + p * kLanes, lo[p]);
    _mm256_storeu_pd(acc + p * kLanes + 4, hi[p]);
  }
  for (int64_t l = 0; c + l < c1; ++l) {  // the block's last elements: the lanes they fall on
    double d[N];
    for (int i = 0; i < N; ++i) d[i] = kBase ? load64(xs[i] + c + l) - load64(base + c + l) : load64(xs[i] + c + l);
    int p = 0;
    for (int i = 0; i < N; ++i)
      for (int j = i; j < N; ++j, ++p) acc[p * kLanes + l] += d[i] * d[j];
  }
}

template <class T>
struct GramBlockAvx2 {
  static void run(double* acc, double* d, const T* const* xs, int n, const T* base, int64_t c0, int64_t c1) {
    if constexpr (!std::is_same_v<T, double>) {
      if (base) {
        if (n == 1) return gram_block_fused<1, true>(acc, xs, base, c0, c1);
        if (n == 2) return gram_block_fused<2, true>(acc, xs, base, c0, c1);
        if (n == 3) return gram_block_fused<3, true>(acc, xs, base, c0, c1);
      } else {
        if (n == 1) return gram_block_fused<1, false>(acc, xs, base, c0, c1);
        if (n == 2) return gram_block_fused<2, false>(acc, xs, base, c0, c1);
        if (n == 3) return gram_block_fused<3, false>(acc, xs, base, c0, c1);
      }
    }
    gram_block_buffered(acc, d, xs, n, base, c0, c1);
  }
};

}  // namespace
}  // namespace fk
