"""Lazy loading of the CUDA extension ``fusion_kernels._C_cuda`` (built only with a CUDA toolkit,
see setup.py). The ``cuda`` backend reports why it cannot run when the module or a GPU is missing."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from . import _native
from .errors import BackendError


@functools.cache
def _module() -> tuple[ModuleType | None, str | None]:
    try:
        from . import _C_cuda
    except ImportError as exc:
        return None, f"the CUDA extension fusion_kernels._C_cuda is not built ({exc}); see setup.py"
    return _C_cuda, None


def unavailable_reason() -> str | None:
    module, reason = _module()
    if module is not None and not torch.cuda.is_available():
        return "no CUDA device"
    return reason


def lib() -> ModuleType:
    module, reason = _module()
    if module is None:
        raise BackendError(f"fusion_kernels: {reason}")
    return module


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer the kernels take."""
    return torch.cuda.current_stream(t.device).cuda_stream


def dtype_code(dtype: torch.dtype) -> int:
    return _native.dtype_code(dtype)


MAX_INPUTS = 64  # kMaxInputs in csrc/cuda/api.h


def too_many(n: int) -> str | None:
    return f"takes at most {MAX_INPUTS} inputs per launch, got {n}" if n > MAX_INPUTS else None
