// AVX2/FMA/F16C kernels: this file alone is compiled with -mavx2 -mfma -mf16c (setup.py), and
// only ever called after runtime.cpp has checked the CPU supports them.
#include "avx2_bodies.h"
#include "lanes_avx2.h"

namespace fk {
const KernelTable& avx2_kernels() {
  static const KernelTable table = [] {
    KernelTable t = make_kernel_table<Avx2Lane, ScalarLane>();
    take_avx2_bodies(t);
    return t;
  }();
  return table;
}
}  // namespace fk
