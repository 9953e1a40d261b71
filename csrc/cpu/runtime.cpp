#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <iterator>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fk {

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");  // false where the OS does not save the zmm state
#elif defined(__aarch64__) || defined(__ARM_NEON)
  f.neon = true;  // baseline on aarch64: the portable kernels are compiled with it
#endif
  return f;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#ifdef FK_HAVE_AVX2
  const CpuFeatures f = cpu_features();
  if (f.avx2 && f.fma && f.f16c && f.avx512f) isas.push_back("avx512");
  if (f.avx2 && f.fma && f.f16c) isas.push_back("avx2");
#endif
  isas.push_back("portable");
  return isas;
}

namespace {
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512"};  // an ISA's code is its index
std::atomic<int> g_isa{-1};  // -1: not chosen yet; else an index of kIsaNames

int isa_code(const std::string& name) {
  for (int code = 0; code < int(std::size(kIsaNames)); ++code)
    if (name == kIsaNames[code]) return code;
  return 0;
}

int active_code() {
  if (g_isa.load() < 0) g_isa.store(isa_code(supported_isas().front()));
  return g_isa.load();
}
}  // namespace

std::string active_isa() { return kIsaNames[active_code()]; }

void set_isa(const std::string& name) {
  const auto isas = supported_isas();
  if (std::find(isas.begin(), isas.end(), name) == isas.end()) {
    std::string known;
    for (const auto& s : isas) known += (known.empty() ? "" : ", ") + s;
    throw std::invalid_argument("isa '" + name + "' is not supported on this CPU/build; supported: " + known);
  }
  g_isa.store(isa_code(name));
}

const KernelTable& active_kernels() {
#ifdef FK_HAVE_AVX2
  switch (active_code()) {
    case 2:
      return avx512_kernels();
    case 1:
      return avx2_kernels();
    default:
      break;
  }
#endif
  return portable_kernels();
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool advise_hugepages(void* ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A freshly mmapped output faults in 4 KiB pages one at a time; on VMs that alone runs at a
  // few GB/s. Huge pages cut the faults 512-fold. Only the 2 MiB-aligned interior is advised.
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

int plan_threads(int64_t n, int threads) {
  // Below this many elements per thread, waking threads costs more than it saves.
  constexpr int64_t kMinPerThread = int64_t(1) << 16;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinPerThread)));
}

void parallel_run(RangeFn fn, const MergeArgs& a, int threads) {
  parallel_chunks(a.numel, plan_threads(a.numel, threads), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

}  // namespace fk
