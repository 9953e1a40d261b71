"""Shared test helpers: the tolerance rule and table, input factories and backend cases.

The tolerance rule. A kernel is checked against the pure-PyTorch reference by
:func:`assert_within_reference_error`: evaluated on the same inputs upcast to float64, the reference
gives the exact answer; the kernel's largest error against it may be at most twice the reference's
own largest error at the inputs' dtype, plus two units in the last place of the largest result (a
result the reference gets exactly, as every float64 one, may still round differently when the kernel
sums in another order). The reference itself is checked
against an independent oracle (numpy in float64, a peer library, a closed form) with the one table
:data:`TOL`; comparisons with peers and models use the named entries of :data:`PEER_TOL`.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

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

# Comparisons that are not one kernel against its reference, each with why it is this loose.
PEER_TOL = {
    # a peer (mergekit, PEFT) computing the same float32 formula in the same order
    "peer_same_order": {"rtol": 1e-6, "atol": 1e-6},
    # ... in another order (its own reductions, norms or view changes)
    "peer_float32": {"rtol": 1e-5, "atol": 1e-6},
    # ... iterating (karcher's fixed point, nuslerp's normalisations) in another order
    "peer_iterative": {"rtol": 2e-5, "atol": 2e-6},
    # one float32 layer after a function-preserving change (a permutation, a fused average)
    "float32_layer": {"rtol": 1e-5, "atol": 1e-5},
    # a float32 network's outputs after a function-preserving change: reordered sums over layers
    "float32_forward": {"rtol": 1e-4, "atol": 1e-4},
    # a Sinkhorn plan stopped at tolerance 1e-5 against another run or backend of it
    "sinkhorn_at_tol": {"rtol": 1e-4, "atol": 1e-7},
    # the marginal error Sinkhorn reports against the same error recomputed in float64 from the
    # returned float32 plan
    "sinkhorn_reported_error": {"rtol": 0.05, "atol": 2e-6},
    # Sinkhorn's marginals at convergence against their targets
    "sinkhorn_marginals": {"rtol": 1e-5, "atol": 1e-5},
    # POT's sinkhorn_log in float64 (stopped at 1e-14) against ours at tol 1e-12
    "pot_float64": {"rtol": 1e-7, "atol": 1e-12},
    # POT in float64 against our float32 run stopped at 1e-6
    "pot_vs_float32": {"rtol": 1e-3, "atol": 1e-7},
    # implicit and unrolled gradients of a converged float64 Sinkhorn
    "gradients_two_ways": {"rtol": 1e-6, "atol": 1e-9},
    # a merge of float32 state dicts against its formula written out in float32
    "float32_formula": {"rtol": 1e-5, "atol": 1e-5},
    # ... through a training loop or a linear solve (RegMean, Fisher from gradients)
    "float32_fitted": {"rtol": 1e-4, "atol": 1e-4},
    # a float64 least-squares solve against numpy's
    "float64_solve": {"rtol": 1e-9, "atol": 1e-9},
    # a float64 sum of products against the same sum in another order
    "float64_sum": {"rtol": 1e-12, "atol": 1e-12},
    # a spherical merge from its float64 Gram matrix against the reference's float32 norms and dots
    # (a Karcher mean's iterations amplify the float32 sums' rounding)
    "gram_vs_float32_sums": {"rtol": 2e-5, "atol": 1e-5},
    # FusionBench's stored outputs: the same float32 formulas in another order
    "fusion_bench": {"rtol": 2e-6, "atol": 2e-6},
    # ... its SVD merges (TSV-M, Iso-C), stored from one CPU and compared on another: LAPACK's rounding
    # moves with the CPU. FusionBench's own TSV-M on an AMD EPYC is 3.9e-5 from its stored output (an
    # Intel Xeon's); ours is 6.3e-7 from FusionBench's on the same machine.
    "fusion_bench_svd": {"rtol": 1e-4, "atol": 1e-4},
    # ... Iso-CTS: a subspace split at a rank where singular values are close
    "fusion_bench_iso_cts": {"rtol": 1e-4, "atol": 1e-4},
}


def assert_peer_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, msg=None) -> None:
    """``actual`` equals ``expected`` within the :data:`PEER_TOL` entry ``kind``."""
    torch.testing.assert_close(actual, expected, **PEER_TOL[kind], msg=msg)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` equals the independent oracle ``expected`` within :data:`TOL` of its dtype."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected.to(actual.device), **TOL[expected.dtype])


def _float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_float64(v) for v in value)
    return value


def assert_within_reference_error(
    actual: torch.Tensor, reference, *args, magnitude: float | None = None, **kwargs
) -> None:
    """The tolerance rule (module docstring): ``actual`` (a kernel's result) against
    ``reference(*args, **kwargs)`` at the inputs' dtype and in float64. ``magnitude``: the largest
    term the result sums, for the ulps where the sum cancels to less than it (the result's largest
    by default)."""
    expected = reference(*args, **kwargs)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    exact = reference(*_float64(args), **_float64(kwargs)).to(torch.float64).cpu()
    if exact.numel() == 0:
        return
    nan = exact.isnan()
    got, want = actual.cpu().double(), expected.cpu().double()
    assert torch.equal(got.isnan(), nan) and torch.equal(want.isnan(), nan), "NaNs where float64 has none"
    exact, got, want = exact[~nan], got[~nan], want[~nan]
    reference_error = (want - exact).abs().max().item()
    kernel_error = (got - exact).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * max(exact.abs().max().item(), magnitude or 0.0)
    bound = 2 * reference_error + 2 * ulp
    assert kernel_error <= bound, (
        f"{actual.dtype}: kernel error {kernel_error:.3g} against float64 exceeds 2 x the reference's "
        f"{reference_error:.3g} + 2 ulp ({ulp:.3g} each)"
    )


# Where the running test's tensors live: the backend fixture sets it (cuda for the cuda backend, and
# for triton when a GPU is present; Triton's interpreter runs on CPU tensors).
_device = ["cpu"]


def device() -> str:
    return _device[0]


def skip_if_reference(backend: str) -> None:
    """Skip a test of scale (2^24 elements: index arithmetic past int32 ranges) on the torch backend,
    which runs the reference itself: it would compare the reference with itself."""
    import pytest

    if backend == "torch":
        pytest.skip("the torch backend runs the reference itself")


def skip_if_interpreted(backend: str, why: str) -> None:
    """Skip a test that Triton's interpreter (one Python step per program and launch) cannot run
    in CI's time; on a GPU it runs."""
    import pytest

    if backend == "triton" and device() == "cpu":
        pytest.skip(f"too slow for Triton's interpreter: {why}; runs where a GPU is")


def randn(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device())


def inputs(n: int, shape, dtype, seed: int = 0) -> list[torch.Tensor]:
    return [randn(shape, dtype, seed + i) for i in range(n)]


def to_numpy64(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64).cpu().numpy()


def from_numpy64(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dtype).to(device())


@contextlib.contextmanager
def _temporarily(get, set_, value):
    """Run a block with ``set_(value)``, restoring ``get()``'s value after it."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def torch_threads(n: int):
    """Run a block with ``torch.set_num_threads(n)`` (the cpu backend's thread count)."""
    return _temporarily(torch.get_num_threads, torch.set_num_threads, n)


def set_isa(isa: str | None):
    """Force the cpu backend's ISA (``avx512``/``avx2``/``portable``) for a block."""
    if isa is None:
        return contextlib.nullcontext()
    from fusion_kernels import _native

    lib = _native.lib()
    return _temporarily(lib.active_isa, lib.set_isa, isa)


@dataclass(frozen=True)
class BackendCase:
    backend: str
    isa: str | None
    device: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return self.backend if self.isa is None else f"{self.backend}-{self.isa}"

    def declared_decline(self, error: Exception) -> bool:
        """Whether ``error`` is this backend refusing what it does not claim to run (the backend
        registry's dtype and op lists) or CPU tensors a test built by hand while the backend runs on
        a GPU, rather than a failure. The helpers' factories put tensors on the backend's device."""
        message = str(error)
        if f"backend {self.backend!r} was requested" not in message:
            return False
        declared = (": does not implement ", ": does not support dtype ")
        cpu_tensors = (", got cpu", "runs on CPU tensors only under Triton's interpreter")
        return any(d in message for d in declared) or (self.device != "cpu" and any(c in message for c in cpu_tensors))


def _backend_cases() -> list[BackendCase]:
    from fusion_kernels import _cuda_native, _native
    from fusion_kernels import triton as fk_triton

    cases = [BackendCase("torch", None, "cpu", None)]
    reason = _native.unavailable_reason()
    if reason is not None:
        cases.append(BackendCase("cpu", "portable", "cpu", f"cpu backend unavailable: {reason}"))
    else:
        supported = _native.lib().supported_isas()
        for isa in ("avx512", "avx2", "portable"):
            skip = None if isa in supported else f"this CPU/build has no {isa} kernels (has {supported})"
            cases.append(BackendCase("cpu", isa, "cpu", skip))
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    triton_reason = fk_triton.unavailable_reason()
    cases.append(BackendCase("triton", None, gpu, triton_reason and f"triton backend unavailable: {triton_reason}"))
    if torch.cuda.is_available():  # without a GPU the cuda cases are left out, not listed as skipped
        cuda_reason = _cuda_native.unavailable_reason()
        cases.append(BackendCase("cuda", None, "cuda", cuda_reason and f"cuda backend unavailable: {cuda_reason}"))
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


def assert_refused(call, error: type[Exception], argument: str) -> None:
    """``call(x)`` on a small float tensor (on the backend's device) raises ``error`` naming ``argument``."""
    import pytest

    with pytest.raises(error) as info:
        call(torch.randn(3, 4, device=device()))
    assert argument in str(info.value)


def with_tied_head(model: Path, into: Path) -> Path:
    """A copy of ``model`` saved as transformers saves tied embeddings: no ``lm_head.weight``, and
    ``tie_word_embeddings: true`` in its config."""
    import json
    import shutil

    from modelfusion.io.checkpoint import SAFETENSORS_INDEX
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, into)
    index = json.loads((into / SAFETENSORS_INDEX).read_text())
    shard = into / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    (into / SAFETENSORS_INDEX).write_text(json.dumps(index))
    config = json.loads((into / "config.json").read_text())
    (into / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return into
