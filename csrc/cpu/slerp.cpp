// slerp: per row, sums of x², y² and x·y in float64 over fixed blocks (summed in block order, so
// results do not depend on threads; inside a block kLanes independent partial sums, added in lane
// order, so the compiler can vectorise without reassociating), coefficients in float64, then one
// combine pass, row by row.
// Semantics: fusion_kernels/reference/slerp.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lanes.h"
#include "runtime.h"
#include "slerp.h"

namespace fk {
namespace {

constexpr int64_t kSlerpBlock = int64_t(1) << 16;
constexpr int kLanes = 8;

template <class T>
void slerp_typed(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t rows, int64_t cols,
                 const std::vector<double>& t, double dot_threshold, double eps, int threads) {
  const T* a = static_cast<const T*>(a_ptr);
  const T* b = static_cast<const T*>(b_ptr);
  T* out = static_cast<T*>(out_ptr);
  const int64_t blocks_per_row = std::max<int64_t>(1, (cols + kSlerpBlock - 1) / kSlerpBlock);
  const int64_t tasks = rows * blocks_per_row;
  std::vector<double> partial(size_t(tasks) * 3, 0.0);
  const int nt = static_cast<int>(std::min<int64_t>(plan_threads(rows * cols, threads), std::max<int64_t>(1, tasks)));
  parallel_pieces(tasks, nt, [&](int, int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks_per_row, block = task % blocks_per_row;
      const int64_t c0 = block * kSlerpBlock, c1 = std::min(cols, c0 + kSlerpBlock);
      const T* ra = a + row * cols;
      const T* rb = b + row * cols;
      double lxx[kLanes] = {}, lyy[kLanes] = {}, lxy[kLanes] = {};
      int64_t c = c0;
      for (; c + kLanes <= c1; c += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double x = ScalarLane::load(ra + c + l), y = ScalarLane::load(rb + c + l);
          lxx[l] += x * x;
          lyy[l] += y * y;
          lxy[l] += x * y;
        }
      }
      double xx = 0, yy = 0, xy = 0;
      for (int l = 0; l < kLanes; ++l) {
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
      partial[size_t(task) * 3] = xx;
      partial[size_t(task) * 3 + 1] = yy;
      partial[size_t(task) * 3 + 2] = xy;
    }
  });
  std::vector<float> coef_a(rows), coef_b(rows);
  for (int64_t row = 0; row < rows; ++row) {
    double xx = 0, yy = 0, xy = 0;
    for (int64_t block = 0; block < blocks_per_row; ++block) {
      const double* p = partial.data() + size_t(row * blocks_per_row + block) * 3;
      xx += p[0];
      yy += p[1];
      xy += p[2];
    }
    double na = std::sqrt(xx), nb = std::sqrt(yy);
    na = na > eps ? na : 1.0;
    nb = nb > eps ? nb : 1.0;
    const double dot = std::clamp(xy / (na * nb), -1.0, 1.0);
    const double tr = t.size() == 1 ? t[0] : t[row];
    if (std::fabs(dot) > dot_threshold) {
      coef_a[row] = float(1.0 - tr);
      coef_b[row] = float(tr);
    } else {
      const double theta = std::acos(dot), s = std::sin(theta);
      coef_a[row] = float(std::sin((1.0 - tr) * theta) / s);
      coef_b[row] = float(std::sin(tr * theta) / s);
    }
  }
  parallel_chunks(rows * cols, plan_threads(rows * cols, threads), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end;) {  // one row's stretch at a time: its coefficients fixed
      const int64_t row = j / cols, stop = std::min(end, (row + 1) * cols);
      const float ca = coef_a[row], cb = coef_b[row];
      for (; j < stop; ++j) ScalarLane::store(out + j, ca * ScalarLane::load(a + j) + cb * ScalarLane::load(b + j));
    }
  });
}

}  // namespace

void slerp(void* out, const void* a, const void* b, int dtype, int64_t rows, int64_t cols,
           const std::vector<double>& t, double dot_threshold, double eps, int threads) {
  switch (dtype) {
    case kFloat16: return slerp_typed<f16>(out, a, b, rows, cols, t, dot_threshold, eps, threads);
    case kBFloat16: return slerp_typed<bf16>(out, a, b, rows, cols, t, dot_threshold, eps, threads);
    default: return slerp_typed<float>(out, a, b, rows, cols, t, dot_threshold, eps, threads);
  }
}

}  // namespace fk
