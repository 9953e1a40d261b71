// pybind11 module fusion_kernels._C. Arguments are raw addresses, sizes and dtype codes: the
// Python layer (fusion_kernels/_native.py) has validated them. Checks here are a last line of
// defence against misuse of the private API, never the user-facing validation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/runtime.h"

namespace py = pybind11;

namespace fk {
namespace {

using Ptrs = std::vector<uintptr_t>;

// Owns the weight arrays and pointer tables that MergeArgs points into.
struct ArgsHolder {
  std::vector<const void*> xs, fs;
  std::vector<float> w32, wavg32;
  std::vector<double> w64, wavg64;
  MergeArgs args;

  ArgsHolder(uintptr_t out, const Ptrs& x_ptrs, const std::vector<double>& w, int64_t numel, int dtype) {
    if (dtype < 0 || dtype >= kNumDTypes) throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
    if (numel < 0) throw std::invalid_argument("numel must be >= 0");
    if (x_ptrs.empty()) throw std::invalid_argument("need at least one input");
    if (w.size() != x_ptrs.size()) throw std::invalid_argument("one weight per input is required");
    for (auto p : x_ptrs) xs.push_back(reinterpret_cast<const void*>(p));
    w64 = w;
    w32.assign(w.begin(), w.end());
    args.numel = numel;
    args.n = static_cast<int>(xs.size());
    args.out = reinterpret_cast<void*>(out);
    args.xs = xs.data();
    args.w32 = w32.data();
    args.w64 = w64.data();
  }
};

void weighted_sum(uintptr_t out, const Ptrs& xs, const std::vector<double>& w, int64_t numel, int dtype,
                  int threads) {
  ArgsHolder h(out, xs, w, numel, dtype);
  parallel_run(active_kernels().weighted_sum[dtype], h.args, threads);
}

void task_arithmetic(uintptr_t out, uintptr_t base, const Ptrs& xs, const std::vector<double>& w, int64_t numel,
                     int dtype, int threads) {
  ArgsHolder h(out, xs, w, numel, dtype);
  h.args.base = reinterpret_cast<const void*>(base);
  parallel_run(active_kernels().task_arithmetic[dtype], h.args, threads);
}

void fisher_merge(uintptr_t out, const Ptrs& xs, const Ptrs& fs, const std::vector<double>& w, double eps,
                  int64_t numel, int dtype, int threads) {
  ArgsHolder h(out, xs, w, numel, dtype);
  if (fs.size() != xs.size()) throw std::invalid_argument("one Fisher tensor per input is required");
  double total = 0.0;
  for (double v : w) total += v;
  if (total == 0.0) throw std::invalid_argument("weights must not sum to zero");
  for (auto p : fs) h.fs.push_back(reinterpret_cast<const void*>(p));
  for (double v : w) {
    h.wavg64.push_back(v / total);
    h.wavg32.push_back(static_cast<float>(v / total));
  }
  h.args.fs = h.fs.data();
  h.args.wavg32 = h.wavg32.data();
  h.args.wavg64 = h.wavg64.data();
  h.args.eps32 = static_cast<float>(eps);
  h.args.eps64 = eps;
  parallel_run(active_kernels().fisher_merge[dtype], h.args, threads);
}

}  // namespace
}  // namespace fk

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusion_kernels C++ CPU kernels (raw pointers; use the fusion_kernels Python API)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("weighted_sum", &fk::weighted_sum, py::arg("out"), py::arg("xs"), py::arg("weights"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("task_arithmetic", &fk::task_arithmetic, py::arg("out"), py::arg("base"), py::arg("xs"), py::arg("weights"),
        py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("fisher_merge", &fk::fisher_merge, py::arg("out"), py::arg("xs"), py::arg("fisher"), py::arg("weights"),
        py::arg("eps"), py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("cpu_features", [] {
    const fk::CpuFeatures f = fk::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["neon"] = f.neon;
    return d;
  });
  m.def("supported_isas", &fk::supported_isas);
  m.def("active_isa", &fk::active_isa);
  m.def("set_isa", &fk::set_isa, py::arg("name"));
  m.def("max_threads", &fk::max_threads);
  m.def(
      "advise_hugepages",
      [](uintptr_t ptr, int64_t nbytes) { return fk::advise_hugepages(reinterpret_cast<void*>(ptr), nbytes); },
      py::arg("ptr"), py::arg("nbytes"));
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
  m.attr("compiler") = __VERSION__;
}
