// slerp: dispatches to the active ISA's kernel (slerp_kernels.h); float64 never reaches it.
#include "slerp.h"

#include "kernels.h"
#include "runtime.h"

namespace fk {

void slerp(void* out, const void* a, const void* b, int dtype, int64_t rows, int64_t cols,
           const std::vector<double>& t, double dot_threshold, double eps, int threads) {
  const int code = dtype == kFloat16 || dtype == kBFloat16 ? dtype : kFloat32;
  active_kernels().slerp[code](out, a, b, rows, cols, t.data(), int64_t(t.size()), dot_threshold, eps, threads);
}

}  // namespace fk
