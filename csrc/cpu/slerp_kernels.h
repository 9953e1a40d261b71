// slerp: per row, sums of x², y² and x·y in float64 over fixed blocks (summed in block order, so
// results do not depend on threads; inside a block kSlerpLanes independent partial sums, added in
// lane order, so the compiler can vectorise without reassociating), coefficients in float64, then
// one combine pass, ca·x + cb·y in float32 (two multiplies and an add, never fused), each block on
// the thread that summed it (parallel_replay).
// Included by each ISA's translation unit (kernel_table.h), so plain arrays only (see gram_kernels.h).
// Semantics: fusion_kernels/reference/slerp.py.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lanes.h"
#include "runtime.h"
#ifdef __AVX2__
#include "gram_avx2.h"
#endif

namespace fk {
namespace {

constexpr int64_t kSlerpBlock = int64_t(1) << 16;
constexpr int kSlerpLanes = 8;

// The float64 sums x², y², x·y of one block [c0, c1) of a row: lane l sums the elements
// c0 + l + kSlerpLanes·k, the lanes are added in order, then the last (c1 - c0) % kSlerpLanes.
template <class T>
void slerp_block_sums(const T* ra, const T* rb, int64_t c0, int64_t c1, double* sums) {
  double lxx[kSlerpLanes] = {}, lyy[kSlerpLanes] = {}, lxy[kSlerpLanes] = {};
  int64_t c = c0;
#ifdef __AVX2__
  static_assert(kSlerpLanes == kLanes, "gram's register block has the same lanes");
  const int64_t whole = c0 + (c1 - c0) / kSlerpLanes * kSlerpLanes;
  double acc[3 * kLanes];  // pairs (x, x), (x, y), (y, y)
  const T* xs[2] = {ra, rb};
  gram_block_fused<2, false>(acc, xs, static_cast<const T*>(nullptr), c0, whole);
  for (int l = 0; l < kSlerpLanes; ++l) {
    lxx[l] = acc[l];
    lxy[l] = acc[kLanes + l];
    lyy[l] = acc[2 * kLanes + l];
  }
  c = whole;
#endif
  for (; c + kSlerpLanes <= c1; c += kSlerpLanes) {
    for (int l = 0; l < kSlerpLanes; ++l) {
      const double x = ScalarLane::load(ra + c + l), y = ScalarLane::load(rb + c + l);
      lxx[l] += x * x;
      lyy[l] += y * y;
      lxy[l] += x * y;
    }
  }
  double xx = 0, yy = 0, xy = 0;
  for (int l = 0; l < kSlerpLanes; ++l) {
    xx += lxx[l];
    yy += lyy[l];
    xy += lxy[l];
  }
  for (; c < c1; ++c) {
    const double x = ScalarLane::load(ra + c), y = ScalarLane::load(rb + c);
    xx += x * x;
    yy += y * y;
    xy += x * y;
  }
  sums[0] = xx;
  sums[1] = yy;
  sums[2] = xy;
}

// t: one factor (n_t == 1) or one per row.
template <class V, class S, class T>
void slerp_rows(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t rows, int64_t cols, const double* t,
                int64_t n_t, double dot_threshold, double eps, int threads) {
  const T* a = static_cast<const T*>(a_ptr);
  const T* b = static_cast<const T*>(b_ptr);
  T* out = static_cast<T*>(out_ptr);
  const int64_t blocks_per_row = std::max<int64_t>(1, (cols + kSlerpBlock - 1) / kSlerpBlock);
  const int64_t tasks = rows * blocks_per_row;
  double* partial = new double[size_t(tasks) * 3];
  int* owner = new int[size_t(tasks)];
  const int nt = static_cast<int>(std::min<int64_t>(plan_threads(rows * cols, threads), std::max<int64_t>(1, tasks)));
  parallel_tasks_owned(tasks, nt, owner, [&](int64_t task) {
    const int64_t row = task / blocks_per_row, block = task % blocks_per_row;
    const int64_t c0 = block * kSlerpBlock, c1 = std::min(cols, c0 + kSlerpBlock);
    slerp_block_sums(a + row * cols, b + row * cols, c0, c1, partial + size_t(task) * 3);
  });
  float* coef_a = new float[size_t(std::max<int64_t>(rows, 1)) * 2];
  float* coef_b = coef_a + std::max<int64_t>(rows, 1);
  for (int64_t row = 0; row < rows; ++row) {
    double xx = 0, yy = 0, xy = 0;
    for (int64_t block = 0; block < blocks_per_row; ++block) {
      const double* p = partial + size_t(row * blocks_per_row + block) * 3;
      xx += p[0];
      yy += p[1];
      xy += p[2];
    }
    double na = std::sqrt(xx), nb = std::sqrt(yy);
    na = na > eps ? na : 1.0;
    nb = nb > eps ? nb : 1.0;
    const double dot = std::clamp(xy / (na * nb), -1.0, 1.0);
    const double tr = n_t == 1 ? t[0] : t[row];
    if (std::fabs(dot) > dot_threshold) {
      coef_a[row] = float(1.0 - tr);
      coef_b[row] = float(tr);
    } else {
      const double theta = std::acos(dot), s = std::sin(theta);
      coef_a[row] = float(std::sin((1.0 - tr) * theta) / s);
      coef_b[row] = float(std::sin(tr * theta) / s);
    }
  }
  delete[] partial;
  // each block combined on the core whose caches its sums' pass left it in
  parallel_replay(tasks, nt, owner, [&](int64_t task) {
    const int64_t row = task / blocks_per_row, block = task % blocks_per_row;
    const int64_t begin = row * cols + block * kSlerpBlock, end = row * cols + std::min(cols, (block + 1) * kSlerpBlock);
    const float ca = coef_a[row], cb = coef_b[row];
    for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      L::store(out + i, L::add(L::mul(L::set1(ca), L::load(a + i)), L::mul(L::set1(cb), L::load(b + i))));
    });
  });
  delete[] coef_a;
  delete[] owner;
}

}  // namespace
}  // namespace fk
