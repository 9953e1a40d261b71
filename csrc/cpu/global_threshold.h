#pragma once
#include <cstdint>
#include <vector>

namespace fk {

// T tensors of M models: xs[t * models + m] is tensor t of model m, bases[t] its base (or bases
// empty: no base), numels[t] its size; ks[m] the rank (1 = largest) wanted for model m.
struct GlobalThresholdArgs {
  int models = 0;
  std::vector<const void*> xs, bases;
  std::vector<int64_t> numels, ks;
};

// Per model, the float32 bits of the ks[m]-th largest |x - base| over all its tensors (float32
// arithmetic; NaN ranks above inf). dtype: float32, float16 or bfloat16.
std::vector<uint32_t> global_threshold(const GlobalThresholdArgs& a, int dtype, int threads);

}  // namespace fk
