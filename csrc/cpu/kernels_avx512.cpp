// AVX-512F kernels: this file alone is compiled with -mavx512f (and the AVX2 flags, for the bodies
// it takes from the AVX2 table), and only ever called after runtime.cpp has checked the CPU and the
// OS support them. Sixteen lanes for every element loop; the Gram blocks and the assignment's
// relaxations keep their AVX2 bodies (avx2_bodies.h), slerp's sums their eight lanes.
// GCC 12's AVX-512 intrinsics initialise their "undefined" operands from themselves, which
// -W(maybe-)uninitialized reports at every inlined use (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "avx2_bodies.h"
#include "lanes_avx512.h"

namespace fk {
const KernelTable& avx512_kernels() {
  static const KernelTable table = [] {
    KernelTable t = make_kernel_table<Avx512Lane, ScalarLane>();
    take_avx2_bodies(t);
    return t;
  }();
  return table;
}
}  // namespace fk
