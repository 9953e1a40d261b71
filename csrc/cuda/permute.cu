// permute_many on CUDA: every tensor in one launch. A table of the tensors (device memory, copied
// on the stream) gives each its first block; a block finds its tensor by binary search, then each
// thread gathers elements: the output index is decomposed over the merged dims and every permuted
// dim's index goes through its permutation. Elements move as 1, 2, 4 or 8-byte words.
#include <algorithm>

#include "api.h"
#include "common.cuh"

namespace fk_cuda {
namespace {

constexpr int64_t kElementsPerBlock = 4096;

struct Job {
  void* out;
  const void* in;
  int64_t numel, first_block;
  int element_size, dims;
  int64_t sizes[kMaxPermuteDims], strides[kMaxPermuteDims];
  const int64_t* perms[kMaxPermuteDims];
};

template <class W>
__device__ void gather(const Job& job, int64_t begin, int64_t end) {
  W* out = static_cast<W*>(job.out);
  const W* in = static_cast<const W*>(job.in);
  for (int64_t o = begin + threadIdx.x; o < end; o += blockDim.x) {
    int64_t rest = o, source = 0;
    for (int d = job.dims - 1; d >= 0; --d) {
      const int64_t i = rest % job.sizes[d];
      rest /= job.sizes[d];
      source += (job.perms[d] ? job.perms[d][i] : i) * job.strides[d];
    }
    out[o] = in[source];
  }
}

__global__ void permute_kernel(const Job* jobs, int count) {
  int lo = 0, hi = count - 1;  // the last job whose first block is <= this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_block <= int64_t(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const Job& job = jobs[lo];
  const int64_t begin = (int64_t(blockIdx.x) - job.first_block) * kElementsPerBlock;
  const int64_t end = begin + kElementsPerBlock < job.numel ? begin + kElementsPerBlock : job.numel;
  switch (job.element_size) {
    case 1: return gather<uint8_t>(job, begin, end);
    case 2: return gather<uint16_t>(job, begin, end);
    case 4: return gather<uint32_t>(job, begin, end);
    default: return gather<uint64_t>(job, begin, end);
  }
}

}  // namespace

void permute_many(const std::vector<PermuteTensor>& tensors, uintptr_t stream) {
  std::vector<Job> jobs;
  int64_t blocks = 0;
  for (const PermuteTensor& t : tensors) {
    const size_t dims = t.sizes.size();
    if (dims == 0 || dims > size_t(kMaxPermuteDims) || t.strides.size() != dims || t.perms.size() != dims)
      throw std::invalid_argument("permute_many: 1 to 8 merged dims, one stride and perm slot each");
    if (t.element_size != 1 && t.element_size != 2 && t.element_size != 4 && t.element_size != 8)
      throw std::invalid_argument("permute_many: elements of 1, 2, 4 or 8 bytes");
    Job job{};
    job.out = reinterpret_cast<void*>(t.out);
    job.in = reinterpret_cast<const void*>(t.in);
    job.element_size = static_cast<int>(t.element_size);
    job.dims = static_cast<int>(dims);
    job.numel = 1;
    for (size_t d = 0; d < dims; ++d) {
      job.sizes[d] = t.sizes[d];
      job.strides[d] = t.strides[d];
      job.perms[d] = reinterpret_cast<const int64_t*>(t.perms[d]);
      job.numel *= t.sizes[d];
    }
    if (job.numel == 0) continue;
    job.first_block = blocks;
    blocks += (job.numel + kElementsPerBlock - 1) / kElementsPerBlock;
    jobs.push_back(job);
  }
  if (jobs.empty()) return;
  if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("permute_many: too many elements for one launch");
  const cudaStream_t s = as_stream(stream);
  Job* table = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&table), jobs.size() * sizeof(Job), s), "permute_many table");
  check(cudaMemcpyAsync(table, jobs.data(), jobs.size() * sizeof(Job), cudaMemcpyHostToDevice, s),
        "permute_many table copy");
  permute_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(table, static_cast<int>(jobs.size()));
  check(cudaGetLastError(), "permute_many launch");
  check(cudaFreeAsync(table, s), "permute_many table free");
  // The host vector may go: cudaMemcpyAsync from pageable memory copies it before returning.
}

}  // namespace fk_cuda
