// AVX2/FMA/F16C kernels: this file alone is compiled with -mavx2 -mfma -mf16c (setup.py), and
// only ever called after runtime.cpp has checked the CPU supports them.
#include "kernel_table.h"
#include "lanes_avx2.h"

namespace fk {
const KernelTable& avx2_kernels() {
  static const KernelTable table = make_kernel_table<Avx2Lane, ScalarLane>();
  return table;
}
}  // namespace fk
