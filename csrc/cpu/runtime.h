// CPU feature detection, ISA choice and the OpenMP driver shared by every op.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace fk {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, neon = false;
};

CpuFeatures cpu_features();
std::vector<std::string> supported_isas();  // best first; "portable" always last
std::string active_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unsupported
const KernelTable& active_kernels();

// Splits [0, a.numel) into one contiguous piece per thread and runs fn on each.
void parallel_run(RangeFn fn, const MergeArgs& a, int threads);
int max_threads();

// Asks the OS to back [ptr, ptr + nbytes) with transparent huge pages before it is first touched
// (Linux madvise; a no-op elsewhere). Returns whether any range was advised.
bool advise_hugepages(void* ptr, int64_t nbytes);

}  // namespace fk
