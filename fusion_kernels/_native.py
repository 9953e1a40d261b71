"""Lazy loading of the C++ extension ``fusion_kernels._C``.

Nothing is imported at package import time: the extension loads on the first CPU op. If it is
missing or broken, the ``cpu`` backend reports why and ops fall back to ``torch`` with one warning.
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType

import torch

from .errors import BackendError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ISA_ENV = "FUSION_KERNELS_CPU_ISA"
HUGEPAGES_ENV = "FUSION_KERNELS_HUGEPAGES"
HUGEPAGE_MIN_BYTES = 4 << 20

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def _load() -> None:
    global _module, _error, _loaded
    with _lock:
        if _loaded:
            return
        try:
            from . import _C
        except ImportError as exc:
            _error = f"the C++ extension fusion_kernels._C is not available ({exc})"
            warnings.warn(
                f"fusion_kernels: {_error}; CPU ops run on the slower 'torch' backend. "
                "Reinstall with a C++ compiler to build it.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            _module = _C
            isa = os.environ.get(ISA_ENV, "auto")
            if isa != "auto":
                try:
                    _C.set_isa(isa)
                except ValueError as exc:
                    _error = f"{ISA_ENV}={isa!r} is invalid: {exc}"
                    _module = None
        _loaded = True


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    _load()
    return _error


def lib() -> ModuleType:
    _load()
    if _module is None:
        raise BackendError(f"fusion_kernels: {_error}")
    return _module


def threads() -> int:
    """Threads for one op: torch's setting, so ``torch.set_num_threads`` governs both."""
    return torch.get_num_threads()


def advise_hugepages(t: torch.Tensor) -> None:
    """Back a large, untouched CPU output with transparent huge pages (see runtime.cpp)."""
    if t.device.type != "cpu" or t.nbytes < HUGEPAGE_MIN_BYTES or os.environ.get(HUGEPAGES_ENV) == "0":
        return
    if unavailable_reason() is None:
        _module.advise_hugepages(t.data_ptr(), t.nbytes)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def pointers(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]
