// Per model and row: rank |tau| along the row, ascending with ties by index (a stable LSD radix
// sort of the float32 bit patterns, 8 bits a pass, skipping bytes every key shares); the element
// of rank r is kept with probability p = (density - eps) + 2·eps·r/(cols - 1), drawn from the DARE
// hash at its flat index: keep = draw24 < floor(p·2^24), every step rounded as the reference does.
#include "della.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lanes.h"
#include "runtime.h"
#include "sparse_kernels.h"

namespace fk {
namespace {

constexpr int64_t kRowsPerTask = 16;

template <class T>
void row_keys(const TaskSource& s, int model, int64_t row, int64_t cols, uint32_t* keys) {
  const T* x = static_cast<const T*>(s.xs[size_t(model)]) + row * cols;
  const T* b = s.base ? static_cast<const T*>(s.base) + row * cols : nullptr;
  for (int64_t j = 0; j < cols; ++j) {
    const float tau = b ? ScalarLane::load(x + j) - ScalarLane::load(b + j) : ScalarLane::load(x + j);
    keys[j] = float_to_bits(tau) & 0x7fffffffu;
  }
}

// order = the indices 0..cols-1 sorted by key, stably (equal keys keep index order).
void stable_order(const uint32_t* keys, int64_t cols, uint32_t* order, uint32_t* spare) {
  uint32_t hist[4][256] = {};
  for (int64_t j = 0; j < cols; ++j)
    for (int p = 0; p < 4; ++p) ++hist[p][(keys[j] >> (8 * p)) & 255u];
  for (int64_t j = 0; j < cols; ++j) order[j] = uint32_t(j);
  uint32_t *src = order, *dst = spare;
  for (int p = 0; p < 4; ++p) {
    if (std::any_of(hist[p], hist[p] + 256, [&](uint32_t c) { return int64_t(c) == cols; })) continue;
    uint32_t at[256], sum = 0;
    for (int v = 0; v < 256; ++v) at[v] = sum, sum += hist[p][v];
    for (int64_t k = 0; k < cols; ++k) {
      const uint32_t j = src[k];
      dst[at[(keys[j] >> (8 * p)) & 255u]++] = j;
    }
    std::swap(src, dst);
  }
  if (src != order) std::memcpy(order, src, size_t(cols) * sizeof(uint32_t));
}

template <class T>
void della_rows(const TaskSource& s, const DellaArgs& a, int model, int64_t r0, int64_t r1, uint8_t* masks) {
  const int64_t cols = a.cols;
  std::vector<uint32_t> keys(static_cast<size_t>(cols)), order(keys.size()), spare(keys.size());
  const float low = a.low[size_t(model)], spread = a.spread[size_t(model)];
  const float last = float(cols - 1);
  const uint32_t s1 = a.s1[size_t(model)], s2 = a.s2[size_t(model)];
  uint8_t* out = masks + int64_t(model) * a.rows * cols;
  for (int64_t row = r0; row < r1; ++row) {
    row_keys<T>(s, model, row, cols, keys.data());
    stable_order(keys.data(), cols, order.data(), spare.data());
    for (int64_t rank = 0; rank < cols; ++rank) {
      const int64_t j = row * cols + order[size_t(rank)];
      const float rank_norm = cols > 1 ? float(rank) / last : 0.f;
      const float p = low + rank_norm * spread;
      const uint32_t inner = uint32_t(mix32<ScalarLane>(static_cast<int32_t>(uint32_t(uint64_t(j) >> 32) ^ s2)));
      const uint32_t h = uint32_t(mix32<ScalarLane>(static_cast<int32_t>(uint32_t(j) ^ s1 ^ inner)));
      out[j] = float(h >> 8) < std::floor(p * 16777216.f) ? 1 : 0;
    }
  }
}

}  // namespace

void della_masks(const TaskSource& s, const DellaArgs& a, uint8_t* masks, int threads) {
  const int n = static_cast<int>(s.xs.size());
  const int64_t blocks = (a.rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_tasks(int64_t(n) * blocks, plan_threads(int64_t(n) * a.rows * a.cols, threads), [&](int64_t t) {
    const int model = static_cast<int>(t / blocks);
    const int64_t r0 = (t % blocks) * kRowsPerTask, r1 = std::min(a.rows, r0 + kRowsPerTask);
    switch (s.dtype) {
      case kFloat16: return della_rows<f16>(s, a, model, r0, r1, masks);
      case kBFloat16: return della_rows<bf16>(s, a, model, r0, r1, masks);
      default: return della_rows<float>(s, a, model, r0, r1, masks);
    }
  });
}

}  // namespace fk
