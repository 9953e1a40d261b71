// The averaging family on CUDA: one launch for up to kMaxInputs models, whose pointers and
// weights travel by value in the kernel's parameters. Accumulates in float32 in input order, with
// the same fused multiply-adds as the reference's add(alpha=) (fusion_kernels/reference/).
#include "api.h"
#include "common.cuh"

namespace fk_cuda {
namespace {

struct Models {
  const void* xs[kMaxInputs];
  const void* fs[kMaxInputs];
  float w[kMaxInputs];
  float w_avg[kMaxInputs];  // fisher_merge's fallback: w / Σw
  int n;
};

template <class T>
__global__ void weighted_sum_kernel(T* out, Models m, int64_t numel) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < numel; j += int64_t(gridDim.x) * blockDim.x) {
    float acc = load(static_cast<const T*>(m.xs[0]) + j) * m.w[0];
    for (int i = 1; i < m.n; ++i) acc = fmaf(load(static_cast<const T*>(m.xs[i]) + j), m.w[i], acc);
    store(out + j, acc);
  }
}

template <class T>
__global__ void task_arithmetic_kernel(T* out, const T* base, Models m, bool add_base, int64_t numel) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < numel; j += int64_t(gridDim.x) * blockDim.x) {
    const float b = load(base + j);
    float acc = add_base ? b : 0.f;
    for (int i = 0; i < m.n; ++i) acc = fmaf(load(static_cast<const T*>(m.xs[i]) + j) - b, m.w[i], acc);
    store(out + j, acc);
  }
}

template <class T>
__global__ void fisher_merge_kernel(T* out, Models m, float eps, int64_t numel) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < numel; j += int64_t(gridDim.x) * blockDim.x) {
    float num = 0.f, den = 0.f, avg = 0.f;
    for (int i = 0; i < m.n; ++i) {
      const float x = load(static_cast<const T*>(m.xs[i]) + j);
      const float wf = load(static_cast<const T*>(m.fs[i]) + j) * m.w[i];
      num = fmaf(wf, x, num);
      den += wf;
      avg = fmaf(x, m.w_avg[i], avg);
    }
    store(out + j, den != 0.f ? num / (den + eps) : avg);
  }
}

Models models(const std::vector<uintptr_t>& xs, const std::vector<double>& w) {
  if (xs.empty() || xs.size() > size_t(kMaxInputs) || w.size() != xs.size())
    throw std::invalid_argument("CUDA merges take 1 to 64 inputs and one weight each");
  Models m{};
  m.n = static_cast<int>(xs.size());
  double total = 0;
  for (double v : w) total += v;
  for (int i = 0; i < m.n; ++i) {
    m.xs[i] = reinterpret_cast<const void*>(xs[size_t(i)]);
    m.w[i] = static_cast<float>(w[size_t(i)]);
    m.w_avg[i] = total != 0 ? static_cast<float>(w[size_t(i)] / total) : 0.f;
  }
  return m;
}

}  // namespace

void weighted_sum(uintptr_t out, const std::vector<uintptr_t>& xs, const std::vector<double>& weights, int64_t numel,
                  int dtype, uintptr_t stream) {
  const Models m = models(xs, weights);
  if (numel == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    weighted_sum_kernel<T><<<blocks_for(numel), kThreads, 0, as_stream(stream)>>>(reinterpret_cast<T*>(out), m, numel);
  });
  check(cudaGetLastError(), "weighted_sum launch");
}

void task_arithmetic(uintptr_t out, uintptr_t base, const std::vector<uintptr_t>& xs,
                     const std::vector<double>& weights, bool add_base, int64_t numel, int dtype, uintptr_t stream) {
  const Models m = models(xs, weights);
  if (numel == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    task_arithmetic_kernel<T><<<blocks_for(numel), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<T*>(out), reinterpret_cast<const T*>(base), m, add_base, numel);
  });
  check(cudaGetLastError(), "task_arithmetic launch");
}

void fisher_merge(uintptr_t out, const std::vector<uintptr_t>& xs, const std::vector<uintptr_t>& fisher,
                  const std::vector<double>& weights, double eps, int64_t numel, int dtype, uintptr_t stream) {
  Models m = models(xs, weights);
  if (fisher.size() != xs.size()) throw std::invalid_argument("fisher_merge: one Fisher tensor per input");
  for (int i = 0; i < m.n; ++i) m.fs[i] = reinterpret_cast<const void*>(fisher[size_t(i)]);
  if (numel == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fisher_merge_kernel<T><<<blocks_for(numel), kThreads, 0, as_stream(stream)>>>(reinterpret_cast<T*>(out), m,
                                                                                   static_cast<float>(eps), numel);
  });
  check(cudaGetLastError(), "fisher_merge launch");
}

}  // namespace fk_cuda
