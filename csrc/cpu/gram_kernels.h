// gram: per row, the float64 dot products of N inputs (less a base) over fixed blocks, each block's
// sums kept apart and added in block order, so results do not depend on threads. Inside a block,
// kLanes independent accumulators per pair let the compiler vectorise without reassociating
// (the sums are therefore in a fixed order too, the same on every ISA). Included by each ISA's
// translation unit (kernel_table.h), so plain arrays only: a standard container's code compiled
// there for AVX2 could be the copy the linker keeps for every caller. Semantics:
// fusion_kernels/reference/gram.py.
#pragma once
#include <algorithm>
#include <cstdint>

#include "lanes.h"
#include "runtime.h"

namespace fk {
namespace {

constexpr int64_t kGramBlock = int64_t(1) << 14;
constexpr int kLanes = 8;
constexpr int64_t kPiece = 1024;

template <class T>
double load64(const T* p) {
  return double(ScalarLane::load(p));
}
inline double load64(const double* p) { return *p; }

// The sums of one block [c0, c1) into acc[pair * kLanes + lane] (zeroed by the caller): pieces of
// kPiece elements converted once into float64 buffers d (n * kPiece doubles, L1-resident), then
// one vectorisable dot product per pair. Lane l takes the elements c0 + l, c0 + l + kLanes, ...
template <class T>
void gram_block_buffered(double* acc, double* d, const T* const* xs, int n, const T* base, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += kPiece) {
    const int64_t width = std::min<int64_t>(kPiece, c1 - c);
    const int64_t padded = (width + kLanes - 1) / kLanes * kLanes;
    for (int i = 0; i < n; ++i) {
      double* di = d + i * kPiece;
      const T* x = xs[i] + c;
      if (base) {
        const T* b = base + c;
        for (int64_t l = 0; l < width; ++l) di[l] = load64(x + l) - load64(b + l);
      } else {
        for (int64_t l = 0; l < width; ++l) di[l] = load64(x + l);
      }
      for (int64_t l = width; l < padded; ++l) di[l] = 0.0;
    }
    int p = 0;
    for (int i = 0; i < n; ++i) {
      const double* di = d + i * kPiece;
      for (int j = i; j < n; ++j, ++p) {
        const double* dj = d + j * kPiece;
        double a[kLanes];
        for (int l = 0; l < kLanes; ++l) a[l] = acc[p * kLanes + l];
        for (int64_t e = 0; e < padded; e += kLanes)
          for (int l = 0; l < kLanes; ++l) a[l] += di[e + l] * dj[e + l];
        for (int l = 0; l < kLanes; ++l) acc[p * kLanes + l] = a[l];
      }
    }
  }
}

template <class T>
struct GramBlockBuffered {
  static void run(double* acc, double* d, const T* const* xs, int n, const T* base, int64_t c0, int64_t c1) {
    gram_block_buffered(acc, d, xs, n, base, c0, c1);
  }
};

// Block: a type with run(acc, d, xs, n, base, c0, c1) as gram_block_buffered, which fixes the sums'
// order (an ISA's faster block must add in the same order, so results do not depend on the ISA).
template <class T, class Block = GramBlockBuffered<T>>
void gram_range(double* out, const void* const* inputs, int n, const void* base_ptr, int64_t rows, int64_t cols,
                int threads) {
  const T* const* xs = reinterpret_cast<const T* const*>(inputs);
  const T* base = static_cast<const T*>(base_ptr);
  const int pairs = n * (n + 1) / 2;
  const int64_t blocks = std::max<int64_t>(1, (cols + kGramBlock - 1) / kGramBlock);
  const int64_t tasks = rows * blocks;
  double* partial = new double[size_t(tasks) * pairs];
  const int nt = static_cast<int>(std::min<int64_t>(plan_threads(rows * cols * n, threads), std::max<int64_t>(1, tasks)));
  // tasks handed out in pieces: a core taken by the pipeline's reader or writer delays one piece
  parallel_chunks(tasks, nt, [&](int64_t begin, int64_t end) {
    double* acc = new double[size_t(pairs) * kLanes];
    double* d = new double[size_t(n) * kPiece];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks, block = task % blocks;
      const int64_t c0 = row * cols + block * kGramBlock;
      const int64_t c1 = row * cols + std::min(cols, (block + 1) * kGramBlock);
      for (int p = 0; p < pairs * kLanes; ++p) acc[p] = 0.0;
      Block::run(acc, d, xs, n, base, c0, c1);
      for (int p = 0; p < pairs; ++p) {
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += acc[p * kLanes + l];
        partial[size_t(task) * pairs + p] = s;
      }
    }
    delete[] acc;
    delete[] d;
  }, 1);
  for (int64_t row = 0; row < rows; ++row) {
    double* g = out + row * n * n;
    int p = 0;
    for (int i = 0; i < n; ++i) {
      for (int j = i; j < n; ++j, ++p) {
        double s = 0.0;
        for (int64_t block = 0; block < blocks; ++block) s += partial[size_t(row * blocks + block) * pairs + p];
        g[i * n + j] = g[j * n + i] = s;
      }
    }
  }
  delete[] partial;
}

}  // namespace
}  // namespace fk
