// CPU feature detection, ISA choice and the OpenMP driver shared by every op.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace fk {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, neon = false;
};

CpuFeatures cpu_features();
std::vector<std::string> supported_isas();  // best first; "portable" always last
std::string active_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unsupported
const KernelTable& active_kernels();

// Threads worth using for n elements (1 below kMinPerThread elements per thread).
int plan_threads(int64_t n, int threads);

// Runs f(thread_id, begin, end) on `t` contiguous pieces of [0, n), each a multiple of 64 elements
// except the last. With t == 1, runs f(0, 0, n) on the calling thread.
template <class F>
void parallel_pieces(int64_t n, int t, F&& f) {
  if (t <= 1) {
    f(0, int64_t(0), n);
    return;
  }
  const int64_t per = ((n + t - 1) / t + 63) / 64 * 64;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static, 1)
#endif
  for (int id = 0; id < t; ++id) {
    const int64_t begin = std::min(n, id * per), end = std::min(n, begin + per);
    f(id, begin, end);
  }
}

// Runs f(i) for i in [0, count) on up to `t` threads, handing out one task at a time.
template <class F>
void parallel_tasks(int64_t count, int t, F&& f) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(std::max(1, t)) schedule(dynamic, 1) if (t > 1 && count > 1)
#endif
  for (int64_t i = 0; i < count; ++i) f(i);
}

// The calling thread's number in its OpenMP team and the team's size (0 and 1 outside one).
inline int team_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// parallel_tasks that records in owner[i] the team thread that ran task i, for parallel_replay.
template <class F>
void parallel_tasks_owned(int64_t count, int t, int* owner, F&& f) {
  parallel_tasks(count, t, [&](int64_t i) {
    owner[i] = team_thread();
    f(i);
  });
}

// Runs f(i) for i in [0, count), each on the thread of a team of `t` that ran task i in
// parallel_tasks_owned (OpenMP reuses its pool's threads in order): a second pass over the data of a
// first one finds it in that core's caches. On a 2-core EPYC VM, slerp over a ViT-B/32 pair:
// 65 ms with both passes handing out pieces, 48 ms replayed, 84 ms with the threads swapped. Every
// task runs once whatever team OpenMP grants (owners beyond it wrap around).
template <class F>
void parallel_replay(int64_t count, int t, const int* owner, F&& f) {
#ifdef _OPENMP
#pragma omp parallel num_threads(std::max(1, t)) if (t > 1 && count > 1)
#endif
  {
    const int id = team_thread(), size = team_size();
    for (int64_t i = 0; i < count; ++i)
      if (owner[i] % size == id) f(i);
  }
}

// The length of parallel_chunks' pieces of [0, n) on t threads: piece p is [p·length, (p+1)·length).
inline int64_t chunk_length(int64_t n, int t, int64_t granule = 64) {
  if (t <= 1) return std::max<int64_t>(n, 1);
  const int64_t length = ((n + 4 * t - 1) / (4 * t) + granule - 1) / granule * granule;
  return std::clamp<int64_t>(length, granule, int64_t(1) << 18);
}

// Runs f(begin, end) over [0, n) in pieces (multiples of `granule`, at least 4 per thread where n
// allows and at most 2^18), handed out one at a time to `t` threads: a thread the OS preempts (say
// for a pipeline's reader or writer) delays only its current piece, not the whole call. For work
// whose result does not depend on the split: elements (granule 64, whole cache lines) or tasks
// (granule 1: a few dozen tasks must still reach every thread).
template <class F>
void parallel_chunks(int64_t n, int t, F&& f, int64_t granule = 64) {
  if (t <= 1) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  const int64_t piece = chunk_length(n, t, granule);
  parallel_tasks((n + piece - 1) / piece, t, [&](int64_t p) { f(p * piece, std::min(n, (p + 1) * piece)); });
}

// Splits [0, a.numel) into pieces handed out to the threads (parallel_chunks) and runs fn on each.
void parallel_run(RangeFn fn, const MergeArgs& a, int threads);
int max_threads();

// Asks the OS to back [ptr, ptr + nbytes) with transparent huge pages before it is first touched
// (Linux madvise; a no-op elsewhere). Returns whether any range was advised.
bool advise_hugepages(void* ptr, int64_t nbytes);

}  // namespace fk
