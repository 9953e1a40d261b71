"""Backend registry and selection.

An op hands :func:`select` its implementations (backend name -> callable). A backend named with
:func:`use_backend` or ``FUSION_KERNELS_BACKEND`` must run the op or the call fails with its
reason; otherwise backends are tried in the device's order and the first that accepts runs.
If none accepts, the error lists every backend's reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import _cuda_native, _native
from . import triton as _triton
from .errors import BackendError

BACKEND_ENV = "FUSION_KERNELS_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    unavailable_reason: Callable[[], str | None]
    device_reason: Callable[[torch.device], str | None] = lambda device: None


_ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = {
    "cpu": Backend("cpu", ("cpu",), _ALL_FLOATS, _native.unavailable_reason),
    "torch": Backend("torch", ("cpu", "cuda", "mps", "xpu", "meta"), _ALL_FLOATS, lambda: None),
    "cuda": Backend("cuda", ("cuda",), (torch.float32, torch.float16, torch.bfloat16), _cuda_native.unavailable_reason),
    # CPU tensors only under Triton's interpreter (tests), never by automatic choice.
    "triton": Backend(
        "triton",
        ("cuda", "cpu"),
        (torch.float32, torch.float16, torch.bfloat16),
        _triton.unavailable_reason,
        _triton.device_reason,
    ),
}
# Automatic choice, best first, per device type; "torch" runs anywhere torch does.
ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusion_kernels_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (from {source}); known backends: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run ops in this block on backend ``name`` (``None``: automatic). Raises if it cannot run an op."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend() -> tuple[str | None, str]:
    """The backend forced by ``use_backend`` or else ``FUSION_KERNELS_BACKEND``, and where it came from."""
    name = _requested.get()
    if name is not None:
        return name, "use_backend"
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env and env != "auto":
        return _check_name(env, f"{BACKEND_ENV}={env!r}"), f"{BACKEND_ENV}"
    return None, "automatic choice"


def decline_reason(
    backend: str, op: str, impls: dict[str, Callable], device: torch.device, dtype: torch.dtype, args: tuple = ()
) -> str | None:
    """Why ``backend`` cannot run ``op`` on these tensors (None if it can). An implementation may
    carry ``dtypes`` (those it takes, None for all) and a ``declines(*args)`` function for limits
    that depend on the call's options."""
    b = BACKENDS[backend]
    if backend not in impls:
        return f"does not implement {op}"
    if device.type not in b.device_types:
        return f"runs on {'/'.join(b.device_types)} tensors, got {device.type}"
    if (reason := b.device_reason(device)) is not None:
        return reason
    dtypes = getattr(impls[backend], "dtypes", b.dtypes)  # an op that moves bytes may take any dtype (None)
    if dtypes is not None and dtype not in dtypes:
        return f"does not support dtype {dtype}"
    reason = b.unavailable_reason()
    declines = getattr(impls[backend], "declines", None)
    return reason if reason is not None or declines is None else declines(*args)


def select(op: str, impls: dict[str, Callable], device: torch.device, dtype: torch.dtype, args: tuple = ()) -> Callable:
    """The implementation of ``op`` to run on tensors of ``device`` and ``dtype`` with ``args``."""
    name, source = requested_backend()
    if name is not None:
        reason = decline_reason(name, op, impls, device, dtype, args)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} was requested ({source}) but cannot run it: {reason}")
        return impls[name]
    candidates = ORDER.get(device.type, ("torch",))
    reasons = []
    for candidate in candidates:
        reason = decline_reason(candidate, op, impls, device, dtype, args)
        if reason is None:
            return impls[candidate]
        reasons.append(f"{candidate}: {reason}")
    raise BackendError(f"{op}: no backend can run on {device} with dtype {dtype}: " + "; ".join(reasons))


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable in this process (for ``device``'s type when given), in automatic-choice order."""
    device_type = None if device is None else torch.device(device).type
    names = ORDER.get(device_type, tuple(BACKENDS)) if device_type else tuple(BACKENDS)
    return [
        n
        for n in names
        if BACKENDS[n].unavailable_reason() is None and (device_type is None or device_type in BACKENDS[n].device_types)
    ]
