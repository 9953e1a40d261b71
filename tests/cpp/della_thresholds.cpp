// DELLA's decide kernel computes the keep threshold of a rank (della_threshold) where the other paths
// read rank_thresholds' table: both must give the same bits for every rank. Built and run by
// tests/test_della_thresholds.py; prints the count of mismatches per lane type and exits 1 on any.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "cpu/lanes_avx2.h"
#include "cpu/lanes_avx512.h"
#include "cpu/della_kernels.h"

using namespace fk;

namespace {

uint32_t table_threshold(int64_t cols, float low, float spread, int64_t rank) {  // rank_thresholds' steps
  const float last = float(cols - 1);
  const float rank_norm = cols > 1 ? float(rank) / last : 0.f;
  const float t = std::floor((low + rank_norm * spread) * 16777216.f);
  return t >= 16777216.f ? 16777216u : t > 0.f ? uint32_t(t) : 0u;
}

template <class L>
long mismatches() {
  const float densities[] = {0.0f, 0.05f, 0.1f, 0.3f, 0.4f, 0.5f, 0.7f, 0.9f, 1.0f};
  const float epsilons[] = {0.0f, 0.01f, 0.1f, 0.15f, 0.3f, 0.5f};
  const int64_t lengths[] = {1, 2, 3, 7, 17, 2048, 5632, 11008, 32000, 100003};
  long bad = 0;
  for (float density : densities)
    for (float epsilon : epsilons)
      for (int64_t cols : lengths) {
        const float low = density - epsilon, spread = 2 * epsilon;
        const DellaRankScale scale{low, spread, cols > 1 ? float(cols - 1) : 1.f};
        for (int64_t r0 = 0; r0 < cols; r0 += L::width) {
          alignas(64) int32_t ranks[kMaxLaneWidth], got[kMaxLaneWidth];
          for (int l = 0; l < L::width; ++l) ranks[l] = int32_t(std::min<int64_t>(r0 + l, cols - 1));
          L::store_i(got, della_threshold<L>(L::load_i(ranks), scale));
          for (int l = 0; l < L::width; ++l) bad += uint32_t(got[l]) != table_threshold(cols, low, spread, ranks[l]);
        }
      }
  return bad;
}

}  // namespace

int main() {
  long bad = mismatches<ScalarLane>();
  std::printf("scalar: %ld mismatches\n", bad);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    const long avx2 = mismatches<Avx2Lane>();
    std::printf("avx2: %ld mismatches\n", avx2);
    bad += avx2;
  }
  if (__builtin_cpu_supports("avx512f")) {
    const long avx512 = mismatches<Avx512Lane>();
    std::printf("avx512: %ld mismatches\n", avx512);
    bad += avx512;
  }
  return bad ? 1 : 0;
}
