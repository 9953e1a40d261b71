// Portable kernels: compiled with the baseline flags of the target (SSE2 on x86-64, NEON on
// aarch64), vectorised by the compiler where it can.
#include "kernel_table.h"

namespace fk {
const KernelTable& portable_kernels() {
  static const KernelTable table = make_kernel_table<ScalarLane, ScalarLane>();
  return table;
}
}  // namespace fk
