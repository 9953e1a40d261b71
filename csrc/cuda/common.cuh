// Shared by the .cu files: storage conversions (round to nearest even, as tensor.to does), the
// dtype switch and error checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fk_cuda {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: throw std::invalid_argument("CUDA kernels take float32, float16 or bfloat16, got code " +
                                         std::to_string(dtype));
  }
}

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over numel elements (at most 65535·8 blocks: plenty to fill a GPU).
inline unsigned blocks_for(int64_t numel) {
  const int64_t want = (numel + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 65535 * 8 ? (want > 0 ? want : 1) : 65535 * 8);
}

}  // namespace fk_cuda
