"""Builds fusion_kernels._C: C++ CPU kernels behind pybind11, with no libtorch dependency.

Per-ISA sources (``*_avx2.cpp``) get their own ``-m`` flags; everything else is portable, so the
wheel runs on any CPU of its architecture and picks the fastest kernels at run time.
Set ``FUSION_KERNELS_NO_EXT=1`` to skip the extension (the package then runs on the torch backend).
"""

import os
import platform
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
ISA_FLAGS = {"_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"]}


def _sources() -> list[str]:
    cpu = sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu")) if f.endswith(".cpp"))
    if not IS_X86:
        cpu = [f for f in cpu if not f.endswith("_avx2.cpp")]
    return ["csrc/bindings.cpp", *cpu]


class BuildExt(build_ext):
    """Adds per-file ISA flags and compiles sources in parallel."""

    def build_extension(self, ext):
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


def _extensions():
    if os.environ.get("FUSION_KERNELS_NO_EXT") == "1":
        return []
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
    packages=[
        "fusion_kernels",
        "fusion_kernels.ops",
        "fusion_kernels.reference",
        "fusion_kernels.compat",
        "modelfusion",
    ],
    package_dir={"modelfusion": "python/modelfusion"},
    package_data={"fusion_kernels": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
