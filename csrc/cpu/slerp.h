#pragma once
#include <cstdint>
#include <vector>

namespace fk {

// out = slerp(a, b, t) per row of a [rows, cols] view; t has one factor or one per row.
void slerp(void* out, const void* a, const void* b, int dtype, int64_t rows, int64_t cols,
           const std::vector<double>& t, double dot_threshold, double eps, int threads);

}  // namespace fk
