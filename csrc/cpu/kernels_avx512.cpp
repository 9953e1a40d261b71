// AVX-512F kernels: this file alone is compiled with -mavx512f (and the AVX2 flags, for the
// kernels it takes from the AVX2 table), and only ever called after runtime.cpp has checked the
// CPU and the OS support them. Sixteen lanes for every element loop; the Gram blocks, slerp's
// sums and the assignment's relaxations keep their AVX2 bodies (their sums' order is fixed by
// eight lanes, which keeps their bits equal to the portable kernels').
// GCC 12's AVX-512 intrinsics initialise their "undefined" operands from themselves, which
// -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "gram_avx2.h"
#include "kernel_table.h"
#include "lanes_avx2.h"
#include "lanes_avx512.h"
#include "lsa_relax_avx2.h"

namespace fk {
const KernelTable& avx512_kernels() {
  static const KernelTable table = [] {
    KernelTable t = make_kernel_table<Avx512Lane, ScalarLane>();
    t.lsa_relax64 = &lsa_relax_avx2<double>;
    t.lsa_relax32 = &lsa_relax_avx2<float>;
    t.lsa_top2_64 = &lsa_top2_avx2<double>;
    t.lsa_top2_32 = &lsa_top2_avx2<float>;
    t.gram[kFloat32] = &gram_range<float, GramBlockAvx2<float>>;
    t.gram[kFloat16] = &gram_range<f16, GramBlockAvx2<f16>>;
    t.gram[kBFloat16] = &gram_range<bf16, GramBlockAvx2<bf16>>;
    return t;
  }();
  return table;
}
}  // namespace fk
