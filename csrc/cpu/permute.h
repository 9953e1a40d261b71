// Gathers along permuted dims: out[i0, ..., iK] = in[p0[i0], ..., pK[iK]] (identity on the other
// dims), for many tensors in one call. Dtype-agnostic: elements are moved as bytes.
#pragma once
#include <cstdint>
#include <vector>

namespace fk {

struct PermuteJob {
  void* out = nullptr;
  const void* in = nullptr;
  int64_t element_size = 0;
  std::vector<int64_t> shape;
  std::vector<const int64_t*> perms;  // one per dim; nullptr leaves the dim as it is
};

void permute_many(const std::vector<PermuteJob>& jobs, int threads);

}  // namespace fk
