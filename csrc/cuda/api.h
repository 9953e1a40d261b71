// Launchers of the CUDA kernels (fusion_kernels._C_cuda). Plain C++ types only, so the pybind11
// bindings compile with the host compiler and no CUDA headers. Pointers are device addresses;
// `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>
#include <vector>

namespace fk_cuda {

// dtype codes as in fusion_kernels/_native.py: 0 float32, 1 float16, 2 bfloat16.
constexpr int kMaxInputs = 64;

void weighted_sum(uintptr_t out, const std::vector<uintptr_t>& xs, const std::vector<double>& weights, int64_t numel,
                  int dtype, uintptr_t stream);
void task_arithmetic(uintptr_t out, uintptr_t base, const std::vector<uintptr_t>& xs,
                     const std::vector<double>& weights, bool add_base, int64_t numel, int dtype, uintptr_t stream);
void fisher_merge(uintptr_t out, const std::vector<uintptr_t>& xs, const std::vector<uintptr_t>& fisher,
                  const std::vector<double>& weights, double eps, int64_t numel, int dtype, uintptr_t stream);

// One tensor of permute_many, its dims already merged (fusion_kernels/ops/permute.py): out[o] =
// in[Σ_d src_d(i_d)·strides[d]] with (i_0, …) o's index over `sizes` and src_d = perms[d][i_d]
// (an int64 device array) or i_d where perms[d] is 0.
struct PermuteTensor {
  uintptr_t out = 0, in = 0;
  int64_t element_size = 0;
  std::vector<int64_t> sizes, strides;
  std::vector<uintptr_t> perms;
};
constexpr int kMaxPermuteDims = 8;

// All tensors in one launch: a table of them in device memory, blocks found by binary search.
void permute_many(const std::vector<PermuteTensor>& tensors, uintptr_t stream);

}  // namespace fk_cuda
