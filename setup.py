"""Builds fusion_kernels._C: C++ CPU kernels behind pybind11, with no libtorch dependency.

Per-ISA sources (``*_avx2.cpp``, ``*_avx512.cpp``) get their own ``-m`` flags; everything else is portable, so the
wheel runs on any CPU of its architecture and picks the fastest kernels at run time.
Set ``FUSION_KERNELS_NO_EXT=1`` to skip the extension (the package then runs on the torch backend).

``fusion_kernels._C_cuda`` (``csrc/cuda``, nvcc, sm_80 and sm_90 plus PTX) is built when nvcc is
found and either torch here is a CUDA build or ``FUSION_KERNELS_CUDA=1`` (needed under pip's build
isolation, which hides torch); ``FUSION_KERNELS_CUDA=0`` never builds it.
"""

import os
import platform
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
ISA_FLAGS = {"_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"], "_avx512.cpp": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"]}


def _sources() -> list[str]:
    cpu = sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu")) if f.endswith(".cpp"))
    if not IS_X86:
        cpu = [f for f in cpu if not f.endswith(tuple(ISA_FLAGS))]
    return ["csrc/bindings.cpp", *cpu]


CUDA_ARCHS = ("80", "90")


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )


def _want_cuda() -> bool:
    """Build _C_cuda with nvcc present and FUSION_KERNELS_CUDA=1, or a CUDA build of torch visible here."""
    flag = os.environ.get("FUSION_KERNELS_CUDA", "auto")
    if flag == "0" or _nvcc() is None:
        return False
    if flag == "1":
        return True
    try:
        import torch
    except ImportError:  # an isolated build environment: set FUSION_KERNELS_CUDA=1 to build anyway
        return False
    return torch.version.cuda is not None


def _cuda_lib(nvcc: str) -> str:
    """The toolkit's lib64: from CUDA_HOME, next to nvcc, or /usr/local/cuda (nvcc may be a wrapper)."""
    roots = [
        os.environ.get("CUDA_HOME", ""),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for root in roots:
        if root and os.path.exists(os.path.join(root, "lib64", "libcudart.so")):
            return os.path.join(root, "lib64")
    raise RuntimeError(f"no libcudart.so found under {roots}; set CUDA_HOME")


# the sources of one extension compile in parallel (setuptools' own --parallel only spreads extensions);
# FUSION_KERNELS_BUILD_JOBS caps the jobs (default: one per CPU)
ParallelCompile("FUSION_KERNELS_BUILD_JOBS", default=0).install()


class BuildExt(build_ext):
    """Adds per-file ISA flags and compiles .cu sources with nvcc."""

    def build_extension(self, ext):
        if ext.name.endswith("_C_cuda"):
            return self._build_cuda(ext)
        self._build_cpu(ext)

    def _build_cuda(self, ext):
        nvcc = _nvcc()
        cu = [src for src in ext.sources if src.endswith(".cu")]
        ext.sources = [src for src in ext.sources if not src.endswith(".cu")]
        os.makedirs(self.build_temp, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")  # PTX: newer GPUs
        for src in cu:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-Icsrc", "-Xcompiler", "-fPIC", *gencode, "-c", src, "-o", obj]
            subprocess.check_call(cmd)
            ext.extra_objects.append(obj)
        cuda_lib = _cuda_lib(nvcc)
        ext.library_dirs.append(cuda_lib)
        ext.runtime_library_dirs.append(cuda_lib)
        ext.libraries.append("cudart")
        super().build_extension(ext)

    def _build_cpu(self, ext):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    extra += flags
            compile_one(obj, src, ext_, cc_args, extra, pp_opts)

        self.compiler._compile = _compile
        try:
            super().build_extension(ext)
        finally:
            del self.compiler._compile


def _cuda_extension():
    cuda = sorted(os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join("csrc", "cuda")))
    return Pybind11Extension(
        "fusion_kernels._C_cuda",
        [f for f in cuda if f.endswith((".cu", ".cpp"))],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )


def _extensions():
    if os.environ.get("FUSION_KERNELS_NO_EXT") == "1":
        return []
    if _want_cuda():
        return [*_cpu_extensions(), _cuda_extension()]
    return _cpu_extensions()


def _cpu_extensions():
    if sys.platform == "darwin":
        omp_compile, omp_link = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    else:
        omp_compile, omp_link = ["-fopenmp"], ["-fopenmp"]
    defines = [("FK_HAVE_AVX2", "1")] if IS_X86 else []
    return [
        Pybind11Extension(
            "fusion_kernels._C",
            _sources(),
            include_dirs=["csrc"],
            define_macros=defines,
            cxx_std=17,
            # no fp contraction: a kernel rounds each product like the reference (fma only where written)
            extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=off", *omp_compile],
            extra_link_args=omp_link,
        )
    ]


setup(
    # discovered, never listed by hand: a package missing from a list is missing from the wheel
    packages=find_packages(include=["fusion_kernels", "fusion_kernels.*"])
    + ["modelfusion", *(f"modelfusion.{p}" for p in find_packages("python/modelfusion"))],
    package_dir={"modelfusion": "python/modelfusion"},
    package_data={"fusion_kernels": ["py.typed"], "modelfusion": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
