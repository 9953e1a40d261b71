// DELLA keep masks (mergekit's della_magprune). Semantics: della_probabilities and
// keep_mask_and_probability in fusion_kernels/reference/sparse_merge.py.
#pragma once
#include <cstdint>
#include <vector>

#include "sparse.h"

namespace fk {

struct DellaArgs {
  int64_t rows = 1, cols = 0;             // each model's task vector as [rows, cols]; ranks run along a row
  std::vector<float> low, spread;         // per model: density - epsilon and 2·epsilon (float32, as the reference)
  std::vector<uint32_t> s1, s2;           // per model: the hash's stream keys (random_mask.stream_keys)
  double* l1 = nullptr;                   // or per model and row, zeroed: (sum |tau|, sum of kept |tau|)
                                          // added at l1[2 * (model * rows + row)]
};

// masks[i * rows * cols + j] = 1 where model i keeps flat element j, else 0.
void della_masks(const TaskSource& s, const DellaArgs& a, uint8_t* masks, int threads);

}  // namespace fk
