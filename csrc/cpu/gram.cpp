// gram: dispatches to the active ISA's kernel (gram_kernels.h).
#include "gram.h"

#include "kernels.h"
#include "runtime.h"

namespace fk {

void gram(double* out, const void* const* xs, int n, const void* base, int dtype, int64_t rows, int64_t cols,
          int threads) {
  active_kernels().gram[dtype](out, xs, n, base, rows, cols, threads);
}

}  // namespace fk
