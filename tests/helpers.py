"""Shared test helpers: the tolerance table, input factories and backend cases."""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# One tolerance per dtype: torch.testing's defaults for float32/16/bf16. Merges here reduce over at
# most 8 inputs, so no looser "long reduction" rule is needed.
TOL = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


def randn(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def inputs(n: int, shape, dtype, seed: int = 0) -> list[torch.Tensor]:
    return [randn(shape, dtype, seed + i) for i in range(n)]


def to_numpy64(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64).numpy()


def from_numpy64(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dtype)


@contextlib.contextmanager
def set_isa(isa: str | None):
    """Force the cpu backend's ISA (``avx2``/``portable``) for a block."""
    if isa is None:
        yield
        return
    from fusion_kernels import _native

    lib = _native.lib()
    previous = lib.active_isa()
    lib.set_isa(isa)
    try:
        yield
    finally:
        lib.set_isa(previous)


@dataclass(frozen=True)
class BackendCase:
    backend: str
    isa: str | None
    skip_reason: str | None

    @property
    def id(self) -> str:
        return self.backend if self.isa is None else f"{self.backend}-{self.isa}"


def _backend_cases() -> list[BackendCase]:
    from fusion_kernels import _native

    cases = [BackendCase("torch", None, None)]
    reason = _native.unavailable_reason()
    if reason is not None:
        return [*cases, BackendCase("cpu", "portable", f"cpu backend unavailable: {reason}")]
    supported = _native.lib().supported_isas()
    for isa in ("avx2", "portable"):
        skip = None if isa in supported else f"this CPU/build has no {isa} kernels (has {supported})"
        cases.append(BackendCase("cpu", isa, skip))
    return cases


BACKEND_CASES = _backend_cases()


def kill_when_journaled(proc, journal, shards: int) -> None:
    """SIGSTOP ``proc`` once ``journal`` records ``shards`` finished shards, then SIGKILL it: stopped
    at once, it can write nothing more. Fails if the process ended first."""
    import json
    import signal
    import time

    while proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["shards"]) >= shards:
                proc.send_signal(signal.SIGSTOP)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.001)
    assert proc.poll() is None, "the merge ended before it could be killed: make the test models bigger"
    proc.kill()
    proc.wait()


def tensors_of(path) -> dict:
    """Every tensor of a checkpoint, read into memory."""
    from modelfusion.io import Checkpoint

    c = Checkpoint(path)
    return {n: c.read(n) for n in c.tensors}
