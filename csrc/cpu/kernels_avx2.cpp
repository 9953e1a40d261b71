// AVX2/FMA/F16C kernels: this file alone is compiled with -mavx2 -mfma -mf16c (setup.py), and
// only ever called after runtime.cpp has checked the CPU supports them.
#include "gram_avx2.h"
#include "kernel_table.h"
#include "lanes_avx2.h"
#include "lsa_relax_avx2.h"

namespace fk {
const KernelTable& avx2_kernels() {
  static const KernelTable table = [] {
    KernelTable t = make_kernel_table<Avx2Lane, ScalarLane>();
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
