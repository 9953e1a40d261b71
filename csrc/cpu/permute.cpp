// permute_many: each tensor is viewed as [outer dims..., L, inner], L its last permuted dim. A
// unit is one inner block; output units are written in order, each read from its source offset
// (the sum of one table entry per permuted-or-not outer dim). Work is cut into chunks of about
// kChunkBytes of output across all tensors and handed to threads one chunk at a time.
#include "permute.h"

#include <algorithm>
#include <cstring>

#include "runtime.h"

namespace fk {
namespace {

constexpr int64_t kChunkBytes = int64_t(256) << 10;

struct Plan {
  const PermuteJob* job = nullptr;
  int last = -1;                              // L; -1: nothing permuted (a plain copy)
  int64_t units_per_row = 1, inner = 1;       // shape[L] and the elements of one unit
  std::vector<std::vector<int64_t>> offsets;  // per dim d < L: source offset (elements) of index i
  std::vector<int64_t> last_offsets;          // dim L: source offset of index i within a row
  std::vector<int32_t> last_index32;          // the same when inner == 1 and it fits in int32
};

struct Chunk {
  const Plan* plan;
  int64_t begin, end;  // units
};

Plan make_plan(const PermuteJob& job) {
  Plan p;
  p.job = &job;
  const int nd = static_cast<int>(job.shape.size());
  for (int d = 0; d < nd; ++d)
    if (job.perms[d]) p.last = d;
  if (p.last < 0) {
    p.units_per_row = 1;
    for (int64_t s : job.shape) p.inner *= s;
    return p;
  }
  for (int d = p.last + 1; d < nd; ++d) p.inner *= job.shape[d];
  std::vector<int64_t> stride(nd, 1);
  for (int d = nd - 2; d >= 0; --d) stride[d] = stride[d + 1] * job.shape[d + 1];
  auto table = [&](int d) {
    std::vector<int64_t> t(job.shape[d]);
    for (int64_t i = 0; i < job.shape[d]; ++i) t[i] = (job.perms[d] ? job.perms[d][i] : i) * stride[d];
    return t;
  };
  for (int d = 0; d < p.last; ++d) p.offsets.push_back(table(d));
  p.units_per_row = job.shape[p.last];
  p.last_offsets = table(p.last);
  if (p.inner == 1 && p.units_per_row <= INT32_MAX)
    p.last_index32.assign(p.last_offsets.begin(), p.last_offsets.end());
  return p;
}

// A row's gathers hit its source in random order, which the hardware prefetcher cannot follow;
// so while gathering one row, prefetch the next row's source (`next`) in order, a line per line
// of output.
template <class T, class Index>
void gather_row(T* __restrict dst, const T* __restrict src, const Index* __restrict index, int64_t begin, int64_t end,
                const char* next) {
  constexpr int64_t per_line = 64 / int64_t(sizeof(T));
  int64_t l = begin;
  for (; l + per_line <= end; l += per_line) {
    if (next) __builtin_prefetch(next + l * int64_t(sizeof(T)));
    for (int64_t k = l; k < l + per_line; ++k) dst[k] = src[index[k]];
  }
  for (; l < end; ++l) dst[l] = src[index[l]];
}

template <class T>
void gather_typed(const Plan& p, char* dst, const char* src, int64_t begin, int64_t end, const char* next) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(src);
  if (!p.last_index32.empty())
    gather_row(d, s, p.last_index32.data(), begin, end, next);
  else
    gather_row(d, s, p.last_offsets.data(), begin, end, next);
}

// Output units [begin, end) of one row: dst and src point at the start of the row, next at the
// source of the row after it (or null).
void copy_units(const Plan& p, char* dst, const char* src, int64_t begin, int64_t end, const char* next) {
  const int64_t es = p.job->element_size;
  if (p.inner == 1) {
    switch (es) {
      case 1: return gather_typed<uint8_t>(p, dst, src, begin, end, next);
      case 2: return gather_typed<uint16_t>(p, dst, src, begin, end, next);
      case 4: return gather_typed<uint32_t>(p, dst, src, begin, end, next);
      case 8: return gather_typed<uint64_t>(p, dst, src, begin, end, next);
      default: break;
    }
  }
  const int64_t unit_bytes = p.inner * es;
  for (int64_t l = begin; l < end; ++l)
    std::memcpy(dst + l * unit_bytes, src + p.last_offsets[l] * es, size_t(unit_bytes));
}

void run_chunk(const Chunk& c) {
  const Plan& p = *c.plan;
  const int64_t es = p.job->element_size;
  char* out = static_cast<char*>(p.job->out);
  const char* in = static_cast<const char*>(p.job->in);
  if (p.last < 0) {  // units are single elements
    std::memcpy(out + c.begin * es, in + c.begin * es, size_t((c.end - c.begin) * es));
    return;
  }
  const int64_t row_bytes = p.units_per_row * p.inner * es;
  auto source_of = [&](int64_t row) {  // row -> outer multi-index (last outer dim fastest) -> offset
    int64_t source = 0;
    for (int d = p.last - 1; d >= 0; --d) {
      const int64_t size = p.job->shape[d];
      source += p.offsets[d][row % size];
      row /= size;
    }
    return in + source * es;
  };
  const int64_t last_row = (c.end - 1) / p.units_per_row;
  for (int64_t u = c.begin; u < c.end;) {
    const int64_t row = u / p.units_per_row, l0 = u % p.units_per_row;
    const int64_t l1 = std::min(p.units_per_row, l0 + (c.end - u));
    copy_units(p, out + row * row_bytes, source_of(row), l0, l1, row < last_row ? source_of(row + 1) : nullptr);
    u += l1 - l0;
  }
}

}  // namespace

void permute_many(const std::vector<PermuteJob>& jobs, int threads) {
  std::vector<Plan> plans;
  plans.reserve(jobs.size());
  int64_t total_elements = 0;
  for (const PermuteJob& job : jobs) {
    plans.push_back(make_plan(job));
    int64_t numel = 1;
    for (int64_t s : job.shape) numel *= s;
    total_elements += numel;
  }
  std::vector<Chunk> chunks;
  for (const Plan& p : plans) {
    const int64_t units = p.last < 0 ? p.inner : [&] {
      int64_t n = p.units_per_row;
      for (int d = 0; d < p.last; ++d) n *= p.job->shape[d];
      return n;
    }();
    const int64_t unit_bytes = p.last < 0 ? p.job->element_size : p.inner * p.job->element_size;
    const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, unit_bytes));
    for (int64_t b = 0; b < units; b += per_chunk) chunks.push_back({&p, b, std::min(units, b + per_chunk)});
  }
  parallel_tasks(static_cast<int64_t>(chunks.size()), plan_threads(total_elements, threads),
                 [&](int64_t i) { run_chunk(chunks[size_t(i)]); });
}

}  // namespace fk
