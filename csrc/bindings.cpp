// pybind11 module fusion_kernels._C. Arguments are raw addresses, sizes and dtype codes: the
// Python layer (fusion_kernels/_native.py) has validated them. Checks here are a last line of
// defence against misuse of the private API, never the user-facing validation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/linear_assignment.h"
#include "cpu/low_rank.h"
#include "cpu/global_threshold.h"
#include "cpu/gram.h"
#include "cpu/permute.h"
#include "cpu/runtime.h"
#include "cpu/sinkhorn.h"
#include "cpu/slerp.h"
#include "cpu/sparse.h"
#include "cpu/sparse_kernels.h"

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
  void set_base(uintptr_t base) { args.base = reinterpret_cast<const void*>(base); }
  void set_eps(double eps) {
    args.eps32 = static_cast<float>(eps);
    args.eps64 = eps;
  }
};

// Runs kernel(begin, end, partial) on parallel_chunks' pieces of [0, numel), each piece adding into
// its own `slots` partial sums (on cache lines of their own while the threads add); returns piece
// p's sums at [p·slots, (p+1)·slots). A thread the OS preempts (a pipeline's reader or writer)
// delays one piece, where a thread's fixed half of the elements delayed the whole call.
template <class T, class Kernel>
std::vector<T> piece_partials(int64_t numel, int threads, size_t slots, Kernel&& kernel) {
  const int64_t length = chunk_length(numel, threads);
  const size_t pieces = size_t(std::max<int64_t>(1, (numel + length - 1) / length));
  const size_t stride = (slots * sizeof(T) + 63) / 64 * 64 / sizeof(T);
  std::vector<T> padded(stride * pieces, T(0)), partial(slots * pieces);
  parallel_chunks(numel, threads, [&](int64_t begin, int64_t end) {
    kernel(begin, end, padded.data() + stride * size_t(begin / length));
  });
  for (size_t p = 0; p < pieces; ++p)
    std::copy_n(padded.data() + stride * p, slots, partial.data() + slots * p);
  return partial;
}

// piece_partials' totals, added in piece order: the same whichever thread took which piece.
template <class T, class Kernel>
std::vector<T> piece_sums(int64_t numel, int threads, size_t slots, Kernel&& kernel) {
  const std::vector<T> partial = piece_partials<T>(numel, threads, slots, kernel);
  std::vector<T> total(slots, T(0));
  for (size_t i = 0; i < partial.size(); ++i) total[i % slots] += partial[i];
  return total;
}

// out = x converted from dtype `from` to dtype `to` (cast.h); float32, float16 and bfloat16 only.
void cast(uintptr_t out, uintptr_t x, int from, int to, int64_t numel, int threads) {
  if (from < 0 || from >= kFloat64 || to < 0 || to >= kFloat64) throw std::invalid_argument("cast: bad dtype code");
  ArgsHolder h(out, {x}, {1.0}, numel, to);
  parallel_run(active_kernels().cast[from][to], h.args, threads);
}

void weighted_sum(uintptr_t out, const Ptrs& xs, const std::vector<double>& w, int64_t numel, int dtype,
                  int threads) {
  ArgsHolder h(out, xs, w, numel, dtype);
  parallel_run(active_kernels().weighted_sum[dtype], h.args, threads);
}

void task_arithmetic(uintptr_t out, uintptr_t base, const Ptrs& xs, const std::vector<double>& w, bool add_base,
                     int64_t numel, int dtype, int threads) {
  ArgsHolder h(out, xs, w, numel, dtype);
  h.set_base(base);
  h.args.add_base = add_base;
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
  h.set_eps(eps);
  parallel_run(active_kernels().fisher_merge[dtype], h.args, threads);
}

void ram_merge(uintptr_t out, uintptr_t base, const Ptrs& xs, const std::vector<double>& scales, double eps,
               int64_t numel, int dtype, int threads) {
  ArgsHolder h(out, xs, scales, numel, dtype);
  h.set_base(base);
  h.set_eps(eps);
  parallel_run(active_kernels().ram_merge[dtype], h.args, threads);
}

void magmax(uintptr_t out, uintptr_t base, const Ptrs& xs, const std::vector<double>& lam, int64_t numel, int dtype,
            int threads) {
  ArgsHolder h(out, xs, lam, numel, dtype);
  h.set_base(base);
  parallel_run(active_kernels().magmax[dtype], h.args, threads);
}

// [shared_0, alone_0, shared_1, alone_1, ...]: per model, the kept elements another model keeps too
// and those only it keeps (one partial count per thread, added here).
std::vector<int64_t> ram_counts(uintptr_t base, const Ptrs& xs, double eps, int64_t numel, int dtype, int threads) {
  ArgsHolder h(0, xs, std::vector<double>(xs.size(), 1.0), numel, dtype);
  h.set_base(base);
  h.set_eps(eps);
  const CountsFn fn = active_kernels().ram_counts[dtype];
  return piece_sums<int64_t>(numel, plan_threads(numel, threads), 2 * xs.size(),
                                  [&](int64_t begin, int64_t end, int64_t* sums) { fn(h.args, begin, end, sums); });
}

// [balance, ties] of TIES' election over the elements kept by per-model magnitude thresholds
// (sign_tally.h); thresholds are float32 values, already rounded up to float32.
std::vector<int64_t> sign_tally(uintptr_t base, const Ptrs& xs, const std::vector<double>& thresholds, int64_t numel,
                                int dtype, int threads) {
  ArgsHolder h(0, xs, thresholds, numel, dtype);
  if (base == 0) throw std::invalid_argument("sign_tally: needs a base");
  h.set_base(base);
  const CountsFn fn = active_kernels().sign_tally[dtype];
  if (fn == nullptr) throw std::invalid_argument("sign_tally takes float32, float16 or bfloat16");
  return piece_sums<int64_t>(numel, plan_threads(numel, threads), 2,
                                  [&](int64_t begin, int64_t end, int64_t* sums) { fn(h.args, begin, end, sums); });
}

// EMR's unified vector and masks written; returns [sum |tau_0|, sum |mask_0 * unified|, ...] (emr.h).
std::vector<double> emr(uintptr_t unified, const Ptrs& masks, uintptr_t base, const Ptrs& xs, int64_t numel, int dtype,
                        int threads) {
  if (xs.empty() || masks.size() != xs.size()) throw std::invalid_argument("emr: one mask per input");
  const EmrFn fn = active_kernels().emr[dtype < 0 || dtype >= kNumDTypes ? 0 : dtype];
  if (dtype < 0 || dtype >= kNumDTypes || fn == nullptr)
    throw std::invalid_argument("emr takes float32, float16 or bfloat16");
  std::vector<const void*> x_ptrs;
  std::vector<uint8_t*> mask_ptrs;
  for (auto p : xs) x_ptrs.push_back(reinterpret_cast<const void*>(p));
  for (auto p : masks) mask_ptrs.push_back(reinterpret_cast<uint8_t*>(p));
  EmrArgs a;
  a.n = static_cast<int>(xs.size());
  a.base = reinterpret_cast<const void*>(base);
  a.xs = x_ptrs.data();
  a.unified = reinterpret_cast<void*>(unified);
  a.masks = mask_ptrs.data();
  return piece_sums<double>(numel, plan_threads(numel * int64_t(xs.size()), threads), 2 * xs.size(),
                                 [&](int64_t begin, int64_t end, double* sums) { fn(a, begin, end, sums); });
}

// SCE's float32 variances across the task vectors written into var; returns how many are not 0 (sce.h).
int64_t sce_variance(uintptr_t var, uintptr_t base, const Ptrs& xs, int64_t numel, int dtype, int threads) {
  ArgsHolder h(var, xs, std::vector<double>(xs.size(), 1.0), numel, dtype);
  h.set_base(base);
  const CountsFn fn = active_kernels().sce_variance[dtype];
  if (fn == nullptr || base == 0) throw std::invalid_argument("sce_variance takes a base and float32, float16 or bfloat16");
  return piece_sums<int64_t>(numel, plan_threads(numel * int64_t(xs.size()), threads), 1,
                                  [&](int64_t begin, int64_t end, int64_t* sums) { fn(h.args, begin, end, sums); })[0];
}

// SCE's energies: per model, the sum of its squared task vector over the kept elements (mask: one
// byte per element, or 0 for all) (sce.h).
std::vector<double> sce_energies(uintptr_t base, const Ptrs& xs, uintptr_t mask, int64_t numel, int dtype,
                                 int threads) {
  ArgsHolder h(0, xs, std::vector<double>(xs.size(), 1.0), numel, dtype);
  h.set_base(base);
  h.args.mask = reinterpret_cast<const uint8_t*>(mask);
  const SumsFn fn = active_kernels().sce_energies[dtype];
  if (fn == nullptr || base == 0) throw std::invalid_argument("sce_energies takes a base and float32, float16 or bfloat16");
  return piece_sums<double>(numel, plan_threads(numel * int64_t(xs.size()), threads), xs.size(),
                                 [&](int64_t begin, int64_t end, double* sums) { fn(h.args, begin, end, sums); });
}

// SCE's mask of the k largest variances, given the k-th largest (threshold), written into mask
// (a byte each; ties at the threshold: the lowest indices), with the energies over it: returns
// [energy_0, ..., energy_{n-1}, kept] (sce.h). cut: the flat index past the last tie kept, as the
// threshold's own search finds it; where it is not given (-1), the counts above and at the threshold
// per piece give the piece that holds it, and a scan of that piece the index.
std::vector<double> sce_select(uintptr_t mask, uintptr_t base, const Ptrs& xs, uintptr_t var, double threshold,
                               int64_t k, int64_t cut, int64_t numel, int dtype, int threads) {
  ArgsHolder h(mask, xs, std::vector<double>(xs.size(), 1.0), numel, dtype);
  h.set_base(base);
  h.set_eps(threshold);
  h.fs.assign(1, reinterpret_cast<const void*>(var));
  h.args.fs = h.fs.data();
  const CountsFn tally = active_kernels().sce_tally[dtype];
  const SceSelectFn fn = active_kernels().sce_select[dtype];
  if (fn == nullptr || base == 0 || var == 0 || mask == 0)
    throw std::invalid_argument("sce_select takes a base, variances, a mask and float32, float16 or bfloat16");
  const int t = std::max(plan_threads(numel * int64_t(xs.size()), threads), 1);
  if (cut < 0) {
    const std::vector<int64_t> counts = piece_partials<int64_t>(
        numel, t, 2, [&](int64_t begin, int64_t end, int64_t* c) { tally(h.args, begin, end, c); });
    const int64_t length = chunk_length(numel, t), pieces = int64_t(counts.size() / 2);
    int64_t ties = k;
    for (int64_t p = 0; p < pieces; ++p) ties -= counts[2 * p];
    cut = ties > 0 ? numel : 0;  // fewer ties than asked for: all of them
    const float* v = reinterpret_cast<const float*>(var);
    for (int64_t p = 0; p < pieces && ties > 0; ++p) {
      if (ties > counts[2 * p + 1]) {
        ties -= counts[2 * p + 1];
        continue;
      }
      for (int64_t j = p * length, end = std::min(numel, (p + 1) * length); j < end && ties > 0; ++j)
        if (v[j] == h.args.eps32 && --ties == 0) cut = j + 1;
    }
  }
  return piece_sums<double>(numel, t, xs.size() + 1,
                            [&](int64_t begin, int64_t end, double* sums) { fn(h.args, begin, end, cut, sums); });
}

// arcee_fusion's importance into out (arcee.h), in blocks of rows handed out one at a time (a core
// taken by the pipeline's reader or writer delays one block, not half the tensor); returns the rows
// left unwritten because they hold a non-finite value.
int64_t arcee_importance(uintptr_t out, uintptr_t base, uintptr_t x, int dtype, int64_t rows, int64_t cols, double eps,
                         int threads) {
  if (dtype < 0 || dtype >= kNumDTypes || rows < 0 || cols < 0)
    throw std::invalid_argument("arcee_importance: bad dtype code or shape");
  const ArceeFn fn = active_kernels().arcee_importance[dtype];
  const int t = static_cast<int>(std::min<int64_t>(plan_threads(rows * cols, threads), std::max<int64_t>(rows, 1)));
  const int64_t per_block = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(cols, 1));
  const int64_t blocks = (rows + per_block - 1) / per_block;
  std::vector<int64_t> skipped(size_t(blocks), 0);
  parallel_tasks(blocks, t, [&](int64_t b) {
    skipped[b] = fn(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(x),
                    cols, b * per_block, std::min(rows, (b + 1) * per_block), eps);
  });
  int64_t total = 0;
  for (int64_t n : skipped) total += n;
  return total;
}

// out = importance >= cut ? x : base (arcee.h).
void arcee_select(uintptr_t out, uintptr_t base, uintptr_t x, uintptr_t importance, double cut, int64_t numel,
                  int dtype, int threads) {
  ArgsHolder h(out, {x}, {1.0}, numel, dtype);
  h.set_base(base);
  h.set_eps(cut);
  h.fs.push_back(reinterpret_cast<const void*>(importance));
  h.args.fs = h.fs.data();
  parallel_run(active_kernels().arcee_select[dtype], h.args, threads);
}

void nearswap(uintptr_t out, uintptr_t base, uintptr_t x, double t, int64_t numel, int dtype, int threads) {
  ArgsHolder h(out, {x}, {1.0}, numel, dtype);
  h.set_base(base);
  h.set_eps(t);
  parallel_run(active_kernels().nearswap[dtype], h.args, threads);
}

TaskSource task_source(uintptr_t base, const Ptrs& xs, int dtype, int64_t numel) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument("sparse kernels take float32, float16 or bfloat16, got dtype code " +
                                std::to_string(dtype));
  if (xs.empty()) throw std::invalid_argument("need at least one input");
  TaskSource s;
  s.dtype = dtype;
  s.numel = numel;
  s.base = reinterpret_cast<const void*>(base);
  for (auto p : xs) s.xs.push_back(reinterpret_cast<const void*>(p));
  return s;
}

std::vector<int64_t> magnitude_select_flat(uintptr_t base, const Ptrs& xs, int dtype, int64_t numel,
                                           const std::vector<int>& models, const std::vector<int64_t>& ks,
                                           int threads) {
  const TaskSource s = task_source(base, xs, dtype, numel);
  if (models.size() != ks.size()) throw std::invalid_argument("one k per query is required");
  for (int m : models)
    if (m < 0 || m >= static_cast<int>(xs.size())) throw std::invalid_argument("query model out of range");
  std::vector<int64_t> flat;
  for (const TopK& r : magnitude_select(s, models, ks, threads)) {
    flat.push_back(r.t);
    flat.push_back(r.cut);
  }
  return flat;
}

void sparse_merge_one(uintptr_t out, uintptr_t base, const Ptrs& xs, int dtype, int64_t rows, int64_t cols,
                      const SparseMergeSpec& spec, int threads) {
  sparse_merge(reinterpret_cast<void*>(out), task_source(base, xs, dtype, rows * cols), rows, cols, spec, threads);
}

void permute_many_flat(const Ptrs& outs, const Ptrs& ins, const std::vector<int64_t>& element_sizes,
                       const std::vector<std::vector<int64_t>>& shapes, const std::vector<Ptrs>& perms, int threads) {
  const size_t n = outs.size();
  if (ins.size() != n || element_sizes.size() != n || shapes.size() != n || perms.size() != n)
    throw std::invalid_argument("permute_many: one out, in, element size, shape and perm list per tensor");
  std::vector<PermuteJob> jobs(n);
  for (size_t t = 0; t < n; ++t) {
    if (perms[t].size() != shapes[t].size()) throw std::invalid_argument("permute_many: one perm slot per dim");
    if (element_sizes[t] <= 0) throw std::invalid_argument("permute_many: element sizes must be positive");
    jobs[t].out = reinterpret_cast<void*>(outs[t]);
    jobs[t].in = reinterpret_cast<const void*>(ins[t]);
    jobs[t].element_size = element_sizes[t];
    jobs[t].shape = shapes[t];
    for (uintptr_t p : perms[t]) jobs[t].perms.push_back(reinterpret_cast<const int64_t*>(p));
  }
  permute_many(jobs, threads);
}

}  // namespace
}  // namespace fk

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusion_kernels C++ CPU kernels (raw pointers; use the fusion_kernels Python API)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("weighted_sum", &fk::weighted_sum, py::arg("out"), py::arg("xs"), py::arg("weights"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("task_arithmetic", &fk::task_arithmetic, py::arg("out"), py::arg("base"), py::arg("xs"), py::arg("weights"),
        py::arg("add_base"), py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("fisher_merge", &fk::fisher_merge, py::arg("out"), py::arg("xs"), py::arg("fisher"), py::arg("weights"),
        py::arg("eps"), py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("ram_merge", &fk::ram_merge, py::arg("out"), py::arg("base"), py::arg("xs"), py::arg("scales"), py::arg("eps"),
        py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("magmax", &fk::magmax, py::arg("out"), py::arg("base"), py::arg("xs"), py::arg("lam"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("ram_counts", &fk::ram_counts, py::arg("base"), py::arg("xs"), py::arg("eps"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def(
      "global_threshold",
      [](const fk::Ptrs& xs, const fk::Ptrs& bases, const std::vector<int64_t>& numels, int models,
         const std::vector<int64_t>& ks, int dtype, int threads) {
        if (dtype != fk::kFloat32 && dtype != fk::kFloat16 && dtype != fk::kBFloat16)
          throw std::invalid_argument("global_threshold takes float32, float16 or bfloat16");
        fk::GlobalThresholdArgs a;
        a.models = models;
        for (auto p : xs) a.xs.push_back(reinterpret_cast<const void*>(p));
        for (auto p : bases) a.bases.push_back(reinterpret_cast<const void*>(p));
        a.numels = numels;
        a.ks = ks;
        return fk::global_threshold(a, dtype, threads);
      },
      py::arg("xs"), py::arg("bases"), py::arg("numels"), py::arg("models"), py::arg("ks"), py::arg("dtype"),
      py::arg("threads"), nogil);
  m.def("emr", &fk::emr, py::arg("unified"), py::arg("masks"), py::arg("base"), py::arg("xs"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("sce_variance", &fk::sce_variance, py::arg("var"), py::arg("base"), py::arg("xs"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("sce_energies", &fk::sce_energies, py::arg("base"), py::arg("xs"), py::arg("mask"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("sce_select", &fk::sce_select, py::arg("mask"), py::arg("base"), py::arg("xs"), py::arg("var"),
        py::arg("threshold"), py::arg("k"), py::arg("cut"), py::arg("numel"), py::arg("dtype"), py::arg("threads"),
        nogil);
  m.def("arcee_importance", &fk::arcee_importance, py::arg("out"), py::arg("base"), py::arg("x"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("threads"), nogil);
  m.def("arcee_select", &fk::arcee_select, py::arg("out"), py::arg("base"), py::arg("x"), py::arg("importance"),
        py::arg("cut"), py::arg("numel"), py::arg("dtype"), py::arg("threads"), nogil);
  m.def("cast", &fk::cast, py::arg("out"), py::arg("x"), py::arg("from"), py::arg("to"), py::arg("numel"),
        py::arg("threads"), nogil);
  m.def("nearswap", &fk::nearswap, py::arg("out"), py::arg("base"), py::arg("x"), py::arg("t"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("sign_tally", &fk::sign_tally, py::arg("base"), py::arg("xs"), py::arg("thresholds"), py::arg("numel"),
        py::arg("dtype"), py::arg("threads"), nogil);
  m.def("magnitude_select", &fk::magnitude_select_flat, py::arg("base"), py::arg("xs"), py::arg("dtype"),
        py::arg("numel"), py::arg("models"), py::arg("ks"), py::arg("threads"), nogil);
  py::enum_<fk::KeepKind>(m, "KeepKind")
      .value("all", fk::KeepKind::kAll)
      .value("magnitude", fk::KeepKind::kMagnitude)
      .value("magnitude_outliers", fk::KeepKind::kMagnitudeOutliers)
      .value("random", fk::KeepKind::kRandom)
      .value("della", fk::KeepKind::kDella)
      .value("mask", fk::KeepKind::kMask)
      .value("threshold", fk::KeepKind::kThreshold);
  py::enum_<fk::Rescale>(m, "Rescale")
      .value("none", fk::Rescale::kNone)
      .value("inverse_density", fk::Rescale::kInverseDensity)
      .value("l1", fk::Rescale::kL1);
  py::class_<fk::ModelKeep>(m, "ModelKeep", "How one model's task vector is sparsified (see csrc/cpu/sparse.h).")
      .def(py::init<>())
      .def_readwrite("kind", &fk::ModelKeep::kind)
      .def_readwrite("density", &fk::ModelKeep::density)
      .def_readwrite("gamma", &fk::ModelKeep::gamma)
      .def_readwrite("epsilon", &fk::ModelKeep::epsilon)
      .def_readwrite("keep", &fk::ModelKeep::keep)
      .def_readwrite("mask", &fk::ModelKeep::mask)
      .def_readwrite("threshold_key", &fk::ModelKeep::threshold_key);
  py::class_<fk::SparseMergeSpec>(m, "SparseMergeSpec", "One sparse merge but its tensors (see csrc/cpu/sparse.h).")
      .def(py::init<>())
      .def_readwrite("models", &fk::SparseMergeSpec::models)
      .def_readwrite("weights", &fk::SparseMergeSpec::weights)
      .def_readwrite("rescale", &fk::SparseMergeSpec::rescale)
      .def_readwrite("consensus", &fk::SparseMergeSpec::consensus)
      .def_readwrite("elect_weighted", &fk::SparseMergeSpec::elect_weighted)
      .def_readwrite("combine", &fk::SparseMergeSpec::combine)
      .def_readwrite("lam", &fk::SparseMergeSpec::lam)
      .def_readwrite("tie", &fk::SparseMergeSpec::tie)
      .def_readwrite("seed", &fk::SparseMergeSpec::seed)
      .def_readwrite("first_model", &fk::SparseMergeSpec::first_model);
  m.attr("L1_RESCALE_EPS") = fk::kL1RescaleEps;
  m.def("sparse_merge", &fk::sparse_merge_one, py::arg("out"), py::arg("base"), py::arg("xs"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("spec"), py::arg("threads"), nogil);
  m.def(
      "slerp",
      [](uintptr_t out, uintptr_t a, uintptr_t b, int dtype, int64_t rows, int64_t cols, const std::vector<double>& t,
         double dot_threshold, double eps, int threads) {
        if (dtype != fk::kFloat32 && dtype != fk::kFloat16 && dtype != fk::kBFloat16)
          throw std::invalid_argument("slerp takes float32, float16 or bfloat16");
        if (t.size() != 1 && int64_t(t.size()) != rows) throw std::invalid_argument("t: one factor or one per row");
        fk::slerp(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                  dtype, rows, cols, t, dot_threshold, eps, threads);
      },
      py::arg("out"), py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("t"),
      py::arg("dot_threshold"), py::arg("eps"), py::arg("threads"), nogil);
  m.def(
      "gram",
      [](uintptr_t out, const fk::Ptrs& xs, uintptr_t base, int dtype, int64_t rows, int64_t cols, int threads) {
        if (dtype < 0 || dtype >= fk::kNumDTypes) throw std::invalid_argument("gram: unknown dtype code");
        if (xs.empty() || rows < 0 || cols < 0) throw std::invalid_argument("gram: need inputs, rows >= 0, cols >= 0");
        std::vector<const void*> ptrs;
        for (auto p : xs) ptrs.push_back(reinterpret_cast<const void*>(p));
        fk::gram(reinterpret_cast<double*>(out), ptrs.data(), int(ptrs.size()), reinterpret_cast<const void*>(base),
                 dtype, rows, cols, threads);
      },
      py::arg("out"), py::arg("xs"), py::arg("base"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("threads"), nogil);
  m.def("permute_many", &fk::permute_many_flat, py::arg("outs"), py::arg("ins"), py::arg("element_sizes"),
        py::arg("shapes"), py::arg("perms"), py::arg("threads"), nogil);
  m.def(
      "sinkhorn",
      [](uintptr_t cost, uintptr_t log_a, uintptr_t log_b, uintptr_t plan, uintptr_t f, uintptr_t g,
         uintptr_t iterations, uintptr_t error, int dtype, int64_t batch, int64_t n, int64_t m, double reg,
         int64_t max_iter, double tol, int64_t check_every, bool log_plan, int threads) {
        if (dtype != fk::kFloat32 && dtype != fk::kFloat64)
          throw std::invalid_argument("sinkhorn takes float32 or float64");
        if (batch < 0 || n < 1 || m < 1 || max_iter < 1 || check_every < 1 || !(reg > 0))
          throw std::invalid_argument("sinkhorn: need batch >= 0, n, m, max_iter, check_every >= 1 and reg > 0");
        fk::SinkhornProblem p;
        p.cost = reinterpret_cast<const void*>(cost);
        p.log_a = reinterpret_cast<const void*>(log_a);
        p.log_b = reinterpret_cast<const void*>(log_b);
        p.plan = reinterpret_cast<void*>(plan);
        p.f = reinterpret_cast<void*>(f);
        p.g = reinterpret_cast<void*>(g);
        p.iterations = reinterpret_cast<int64_t*>(iterations);
        p.error = reinterpret_cast<double*>(error);
        p.batch = batch;
        p.n = n;
        p.m = m;
        p.reg = reg;
        p.max_iter = max_iter;
        p.tol = tol;
        p.check_every = check_every;
        p.log_plan = log_plan;
        fk::sinkhorn(p, dtype, threads);
      },
      py::arg("cost"), py::arg("log_a"), py::arg("log_b"), py::arg("plan"), py::arg("f"), py::arg("g"),
      py::arg("iterations"), py::arg("error"), py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("m"),
      py::arg("reg"), py::arg("max_iter"), py::arg("tol"), py::arg("check_every"), py::arg("log_plan"),
      py::arg("threads"), nogil);
  m.def(
      "linear_assignment",
      [](uintptr_t cost, bool float32, bool maximize, int64_t batch, int64_t n, int64_t m, bool warm, uintptr_t v,
         uintptr_t perm, int threads) {
        if (batch < 0 || n < 0 || n > m) throw std::invalid_argument("linear_assignment: need 0 <= n <= m");
        if (n > INT32_MAX) throw std::invalid_argument("linear_assignment: need n < 2^31 rows");
        if (warm && n != m) throw std::invalid_argument("linear_assignment: warm starts need square costs");
        fk::linear_assignment(reinterpret_cast<const void*>(cost), float32, maximize ? -1.0 : 1.0, batch, n, m, warm,
                              reinterpret_cast<double*>(v), reinterpret_cast<int64_t*>(perm), threads);
      },
      py::arg("cost"), py::arg("float32"), py::arg("maximize"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("warm"), py::arg("v"), py::arg("perm"),
      py::arg("threads"), nogil);
  m.def(
      "set_lapack",
      [](const std::vector<uintptr_t>& fns, uintptr_t set_threads_local) {
        if (fns.size() != 10) throw std::invalid_argument("set_lapack: need 10 routines");
        const void* table[10];
        for (int i = 0; i < 10; ++i) table[i] = reinterpret_cast<const void*>(fns[i]);
        fk::set_lapack(table, reinterpret_cast<const void*>(set_threads_local));
      },
      py::arg("fns"), py::arg("set_threads_local"));
  m.def("lapack_ready", &fk::lapack_ready);
  m.def(
      "gram_eigh",
      [](uintptr_t a, bool transposed, bool f64, int64_t batch, int64_t p, int64_t q, int64_t k, double min_ratio,
         uintptr_t lam, uintptr_t vecs, int threads) {
        return fk::gram_eigh(reinterpret_cast<const void*>(a), transposed, f64, batch, p, q, k, min_ratio,
                             reinterpret_cast<void*>(lam), reinterpret_cast<void*>(vecs), threads);
      },
      py::arg("a"), py::arg("transposed"), py::arg("f64"), py::arg("batch"), py::arg("p"), py::arg("q"), py::arg("k"),
      py::arg("min_ratio"), py::arg("lam"),
      py::arg("vecs"), py::arg("threads"), nogil);
  m.def(
      "thin_svd",
      [](uintptr_t a, bool f64, int64_t batch, int64_t m, int64_t n, uintptr_t u, uintptr_t s, uintptr_t vh,
         int threads) {
        return fk::thin_svd(reinterpret_cast<const void*>(a), f64, batch, m, n, reinterpret_cast<void*>(u),
                            reinterpret_cast<void*>(s), reinterpret_cast<void*>(vh), threads);
      },
      py::arg("a"), py::arg("f64"), py::arg("batch"), py::arg("m"), py::arg("n"), py::arg("u"), py::arg("s"),
      py::arg("vh"), py::arg("threads"), nogil);
  m.def("cpu_features", [] {
    const fk::CpuFeatures f = fk::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512f"] = f.avx512f;
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
