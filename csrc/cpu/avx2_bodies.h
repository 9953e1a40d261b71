// The AVX2 bodies both x86 kernel tables take in place of their lane instantiations: the Gram
// blocks and the assignment's relaxations, whose sums' order eight lanes fix (the same bits as the
// portable kernels'). Included by kernels_avx2.cpp and kernels_avx512.cpp.
#pragma once
#include "gram_avx2.h"
#include "kernel_table.h"
#include "lsa_relax_avx2.h"

namespace fk {
namespace {

inline void take_avx2_bodies(KernelTable& t) {
  t.lsa_relax64 = &lsa_relax_avx2<double>;
  t.lsa_relax32 = &lsa_relax_avx2<float>;
  t.lsa_top2_64 = &lsa_top2_avx2<double>;
  t.lsa_top2_32 = &lsa_top2_avx2<float>;
  t.gram[kFloat32] = &gram_range<float, GramBlockAvx2<float>>;
  t.gram[kFloat16] = &gram_range<f16, GramBlockAvx2<f16>>;
  t.gram[kBFloat16] = &gram_range<bf16, GramBlockAvx2<bf16>>;
}

}  // namespace
}  // namespace fk
