// pybind11 module fusion_kernels._C_cuda: the CUDA launchers of api.h (raw device pointers and a
// stream handle; the Python layer validated every argument). Built only with a CUDA toolkit and a
// CUDA build of torch (setup.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "api.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fusion_kernels CUDA kernels (raw device pointers; use the fusion_kernels Python API)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("weighted_sum", &fk_cuda::weighted_sum, py::arg("out"), py::arg("xs"), py::arg("weights"), py::arg("numel"),
        py::arg("dtype"), py::arg("stream"), nogil);
  m.def("task_arithmetic", &fk_cuda::task_arithmetic, py::arg("out"), py::arg("base"), py::arg("xs"),
        py::arg("weights"), py::arg("add_base"), py::arg("numel"), py::arg("dtype"), py::arg("stream"), nogil);
  m.def("fisher_merge", &fk_cuda::fisher_merge, py::arg("out"), py::arg("xs"), py::arg("fisher"), py::arg("weights"),
        py::arg("eps"), py::arg("numel"), py::arg("dtype"), py::arg("stream"), nogil);
  py::class_<fk_cuda::PermuteTensor>(m, "PermuteTensor")
      .def(py::init([](uintptr_t out, uintptr_t in, int64_t element_size, std::vector<int64_t> sizes,
                       std::vector<int64_t> strides, std::vector<uintptr_t> perms) {
             return fk_cuda::PermuteTensor{out, in, element_size, std::move(sizes), std::move(strides),
                                           std::move(perms)};
           }),
           py::arg("out"), py::arg("in_"), py::arg("element_size"), py::arg("sizes"), py::arg("strides"),
           py::arg("perms"));
  m.def("permute_many", &fk_cuda::permute_many, py::arg("tensors"), py::arg("stream"), nogil);
  m.attr("max_inputs") = fk_cuda::kMaxInputs;
}
