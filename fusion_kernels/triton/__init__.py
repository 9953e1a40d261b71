"""Triton kernels: the ``triton`` backend for CUDA tensors.

On a machine without a GPU the same kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how CI tests them. Nothing here is imported until an op runs on
this backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _import_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


def unavailable_reason() -> str | None:
    """Why the backend cannot run here at all, or None."""
    reason = _import_reason()
    if reason is None and not interpreting() and not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors)"
    return reason


def device_reason(device: torch.device) -> str | None:
    """Why the backend cannot run on tensors of ``device`` (None if it can)."""
    if device.type == "cpu" and not interpreting():
        return "runs on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1)"
    return None


def lazy(stem: str, name: str | None = None):
    """The launcher ``fusion_kernels.triton.<stem>.<name or stem>``, imported (with Triton) on first call."""
    name = name or stem

    def launch(*args):
        module = importlib.import_module(f"{__name__}.{stem}")
        return getattr(module, name)(*args)

    launch.__name__ = f"triton_{name}"
    return launch
