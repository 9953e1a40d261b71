#pragma once
#include <cstdint>

namespace fk {

// out[r][i][j] = sum_c (xs[i] - base)[r, c] * (xs[j] - base)[r, c] over each row of [rows, cols]
// views (base may be null: no subtraction), in float64; out holds rows * n * n doubles.
void gram(double* out, const void* const* xs, int n, const void* base, int dtype, int64_t rows, int64_t cols,
          int threads);

}  // namespace fk
