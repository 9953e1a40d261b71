"""Backend selection, the environment variables, the missing-extension fallback and the info command."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusion_kernels as fk
from fusion_kernels import _dispatch, _native

WEIGHTED_SUM = importlib.import_module("fusion_kernels.ops.weighted_sum")
NEEDS_EXT = pytest.mark.skipif(
    _native.unavailable_reason() is not None, reason=f"cpu backend unavailable: {_native.unavailable_reason()}"
)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_public_api_is_exactly_the_documented_names():
    subpackages = {
        "errors",
        "ops",
        "reference",
        "info",
        "compat",
        "triton",
        "methods",
        "spherical",
    }  # present once something imports them
    public = {name for name in dir(fk) if not name.startswith("_")} - subpackages
    assert set(fk.__all__) - {"__version__"} == public
    assert issubclass(fk.FusionError, ValueError)


@NEEDS_EXT
def test_cpu_is_chosen_automatically_for_cpu_tensors(monkeypatch):
    chosen = []
    monkeypatch.setitem(WEIGHTED_SUM.IMPLS, "cpu", lambda out, xs, w: chosen.append("cpu") or out.zero_())
    fk.weighted_sum([torch.ones(3)])
    assert chosen == ["cpu"]
    assert fk.available_backends("cpu") == ["cpu", "torch"]


def test_use_backend_forces_and_restores(monkeypatch):
    chosen = []
    monkeypatch.setitem(WEIGHTED_SUM.IMPLS, "torch", lambda out, xs, w: chosen.append("torch") or out.zero_())
    with fk.use_backend("torch"):
        fk.weighted_sum([torch.ones(3)])
        assert _dispatch.requested_backend() == ("torch", "use_backend")
    assert _dispatch.requested_backend()[0] is None
    assert chosen == ["torch"]


def test_unknown_backend_name():
    with (
        pytest.raises(fk.BackendError, match="unknown backend 'cuda-ish'.*known backends: cpu, torch, cuda, triton"),
        fk.use_backend("cuda-ish"),
    ):
        pass


def test_env_var_selects_backend_and_rejects_unknown(monkeypatch):
    monkeypatch.setenv("FUSION_KERNELS_BACKEND", "torch")
    assert _dispatch.requested_backend() == ("torch", "FUSION_KERNELS_BACKEND")
    monkeypatch.setenv("FUSION_KERNELS_BACKEND", "auto")
    assert _dispatch.requested_backend()[0] is None
    monkeypatch.setenv("FUSION_KERNELS_BACKEND", "nope")
    with pytest.raises(fk.BackendError, match="FUSION_KERNELS_BACKEND='nope'"):
        fk.weighted_sum([torch.ones(2)])


# Meta tensors never reach the dispatcher (the custom op's fake kernel handles them), so a
# non-CPU device is exercised through select() directly.
def test_requested_backend_that_cannot_run_fails_loudly():
    with fk.use_backend("cpu"), pytest.raises(fk.BackendError, match="backend 'cpu' was requested.*got cuda"):
        _dispatch.select("weighted_sum", WEIGHTED_SUM.IMPLS, torch.device("cuda"), torch.float32)


def test_automatic_choice_falls_back_quietly_on_other_devices():
    impl = _dispatch.select("weighted_sum", WEIGHTED_SUM.IMPLS, torch.device("mps"), torch.float32)
    assert impl is WEIGHTED_SUM.IMPLS["torch"]
    # CUDA tensors: Triton first where it can run, else torch; float64 (no Triton kernels) on torch.
    expected = "triton" if _dispatch.BACKENDS["triton"].unavailable_reason() is None else "torch"
    impl = _dispatch.select("weighted_sum", WEIGHTED_SUM.IMPLS, torch.device("cuda"), torch.float32)
    assert impl is WEIGHTED_SUM.IMPLS[expected]
    impl = _dispatch.select("weighted_sum", WEIGHTED_SUM.IMPLS, torch.device("cuda"), torch.float64)
    assert impl is WEIGHTED_SUM.IMPLS["torch"]


def test_meta_tensors_give_shapes_without_running_kernels():
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    out = fk.weighted_sum([x, x], [0.5, 0.5])
    assert out.device.type == "meta" and out.shape == (3, 5) and out.dtype == torch.bfloat16


def test_error_lists_every_backend_reason(monkeypatch):
    monkeypatch.setitem(_dispatch.ORDER, "cpu", ("cpu",))
    monkeypatch.setattr(_native, "_error", "simulated missing extension")
    monkeypatch.setattr(_native, "_module", None)
    with pytest.raises(fk.BackendError, match="no backend can run.*cpu: simulated missing extension"):
        fk.weighted_sum([torch.ones(2)])


def test_missing_extension_falls_back_to_torch_and_warns_once():
    result = run_python("""
        import sys, warnings
        sys.modules["fusion_kernels._C"] = None  # makes `from . import _C` raise ImportError
        import torch, fusion_kernels as fk
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fk.weighted_sum([torch.ones(3), torch.ones(3)], [1.0, 2.0])
            b = fk.weighted_average([torch.ones(3)])
        assert torch.equal(a, torch.full((3,), 3.0)) and torch.equal(b, torch.ones(3))
        messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
        assert len(messages) == 1, messages
        assert "cpu" not in fk.available_backends(), fk.available_backends()
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@NEEDS_EXT
def test_isa_env_var(monkeypatch):
    result = run_python(
        """
        import torch, fusion_kernels as fk
        from fusion_kernels import _native
        fk.weighted_sum([torch.ones(3)])
        print(_native.lib().active_isa())
    """,
        FUSION_KERNELS_CPU_ISA="portable",
    )
    assert result.stdout.strip() == "portable", result.stderr
    bad = run_python(
        """
        import torch, fusion_kernels as fk
        try:
            with fk.use_backend("cpu"):
                fk.weighted_sum([torch.ones(3)])
        except fk.BackendError as e:
            print(e)
    """,
        FUSION_KERNELS_CPU_ISA="sse9",
    )
    assert "FUSION_KERNELS_CPU_ISA='sse9' is invalid" in bad.stdout, bad.stdout + bad.stderr


def test_info_command_reports_backends_and_features():
    result = subprocess.run([sys.executable, "-m", "fusion_kernels.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends_available" in result.stdout and "torch" in result.stdout
    if _native.unavailable_reason() is None:
        assert "cpu_features" in result.stdout and "cpu_isa_active" in result.stdout


def test_plain_eager_calls_skip_the_dispatcher_and_its_dynamo_import():
    proc = run_python(
        """
        import sys, torch, fusion_kernels as fk
        xs = [torch.randn(64, 33) for _ in range(3)]
        fk.weighted_sum(xs); fk.task_arithmetic(xs[0], xs[1:]); fk.dare_merge(xs[0], xs[1:], density=0.5)
        fk.ties_merge(xs[0], xs[1:], density=0.3); fk.fisher_merge(xs, [x.abs() for x in xs]); fk.slerp(*xs[:2], 0.3)
        fk.magnitude_prune(xs[0], 0.5); fk.permute(xs[0], {0: torch.randperm(64)})
        print("torch._dynamo" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_out_argument_gets_its_version_bumped_like_a_dispatched_mutation():
    xs = [torch.randn(5, 7) for _ in range(2)]
    out = torch.empty(5, 7)
    before = out._version
    fk.weighted_sum(xs, out=out)
    assert out._version > before
    torch.testing.assert_close(out, xs[0] + xs[1])


def test_modes_and_autograd_still_go_through_the_dispatcher():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    xs = [torch.randn(4, 3) for _ in range(2)]
    with Record():
        out = fk.weighted_sum(xs, [0.5, 2.0])
    assert any("fusion_kernels.weighted_sum" in name for name in seen)
    torch.testing.assert_close(out, 0.5 * xs[0] + 2.0 * xs[1])

    leaf = torch.randn(4, 3, requires_grad=True)
    fk.weighted_sum([leaf, xs[1]], [3.0, 1.0]).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full((4, 3), 3.0))


def test_fake_tensors_get_shapes_without_running_a_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xs = [torch.empty(8, 6, dtype=torch.bfloat16) for _ in range(3)]
        out = fk.ties_merge(xs[0], xs[1:], density=0.5)
    assert out.shape == (8, 6) and out.dtype == torch.bfloat16 and type(out) is not torch.Tensor


def test_triton_declines_float64_and_ops_it_lacks_with_reasons():
    pytest.importorskip("triton")  # the README's test command installs it; CI requires it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.ones(4, dtype=torch.float64, device=device)
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="dtype torch.float64"):
        fk.weighted_sum([x, x])
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="does not implement"):
        fk.linear_assignment(torch.eye(3, device=device))
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="complex"):
        fk.permute(torch.ones(3, dtype=torch.complex64, device=device), {0: [2, 1, 0]})


def test_cpu_tensors_are_never_sent_to_triton_automatically():
    assert "triton" not in fk.available_backends("cpu")


def test_an_unavailable_cuda_backend_declines_with_its_reason():
    from fusion_kernels import _cuda_native

    if _cuda_native.unavailable_reason() is None:
        pytest.skip("the cuda backend is available here")
    x = torch.ones(3)
    with fk.use_backend("cuda"), pytest.raises(fk.BackendError, match="backend 'cuda'"):
        fk.weighted_sum([x, x])


def test_every_custom_op_has_an_opcheck_test():
    """Each op registered under torch.ops.fusion_kernels is named in some test that calls opcheck."""
    from pathlib import Path

    ops = {name for name in dir(torch.ops.fusion_kernels) if not name.startswith("_") and name != "name"}
    assert {"weighted_sum", "sparse_merge", "permute_many", "sinkhorn", "linear_assignment"} <= ops
    checked = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        if "torch.library.opcheck(" in text:
            checked |= {op for op in ops if f"fusion_kernels.{op}." in text or f'"{op}"' in text}
    assert ops <= checked, f"custom ops without an opcheck test: {sorted(ops - checked)}"


def _elementwise_merges(dtype, specials: bool):
    """Every op whose kernels are element loops over lanes, on inputs with odd tails that several
    threads split (70001 elements a row); ``specials`` puts ±0, subnormals, huge values, ±inf and
    NaN among them (an op that refuses them must refuse them under every ISA)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3, 70001, generator=g).to(dtype)
    xs = [(base.float() + 0.1 * torch.randn(3, 70001, generator=g)).to(dtype) for _ in range(3)]
    if specials:
        tiny, huge = torch.finfo(dtype).tiny, torch.finfo(dtype).max
        values = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 2, huge, -huge, float("inf"), float("nan")])
        for i, x in enumerate([base, *xs]):
            x.view(-1)[i * 997 : i * 997 + 8 * 4099 : 4099] = values.to(dtype)
    w = [0.5, 0.3, 0.2]
    cases = {
        "weighted_sum": lambda: fk.weighted_sum([base, *xs], [0.2, 0.3, 0.4, 0.1]),
        "task_arithmetic": lambda: fk.task_arithmetic(base, xs, w),
        "task_vector_sum": lambda: fk.task_arithmetic(base, xs, w, add_base=False),
        "ties": lambda: fk.ties_merge(base, xs, w, density=0.3),
        "dare_ties": lambda: fk.dare_merge(base, xs, w, density=0.3, seed=3),
        "dare_linear": lambda: fk.dare_merge(base, xs, w, density=0.3, seed=3, consensus=None),
        "breadcrumbs": lambda: fk.breadcrumbs_merge(base, xs, w, density=0.5, gamma=0.02),
        "della": lambda: fk.della_merge(base, xs, w, density=0.4, epsilon=0.1, seed=3),
        "magmax": lambda: fk.magmax(base, xs),
        "nearswap": lambda: fk.nearswap(base, xs[0], 0.01),
        "ram": lambda: fk.ram_merge(base, xs, 1e-3),
        "magnitude_prune": lambda: fk.magnitude_prune(xs[0], 0.3),
        "arcee_importance": lambda: fk.arcee_importance(base, xs[0]),
        "sce_variance": lambda: fk.sce_variance(base, xs),
        "slerp": lambda: fk.slerp(xs[0], xs[1], 0.3),
        "cast": lambda: tuple(fk.cast(xs[0], d) for d in (torch.float32, torch.float16, torch.bfloat16)),
    }
    if dtype == torch.float32:
        cases["fisher"] = lambda: fk.fisher_merge(xs, [x.abs() + 0.1 for x in xs])
    return cases


@NEEDS_EXT
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_avx512_kernels_give_the_avx2_bits(dtype, specials):
    """The 16-lane kernels load, compute and round each element as the 8-lane ones (DARE's draws:
    lanes 8-15 take the high halves of lanes 0-7's hashes), so every element loop gives equal bits
    (NaN where the other gives NaN) or the same error."""
    supported = _native.lib().supported_isas()
    if "avx512" not in supported:
        pytest.skip(f"this CPU/build has no avx512 kernels (has {supported})")
    lib = _native.lib()
    for name, run in _elementwise_merges(dtype, specials).items():
        got = {}
        for isa in ("avx512", "avx2"):
            previous = lib.active_isa()
            lib.set_isa(isa)
            try:
                with fk.use_backend("cpu"):
                    got[isa] = run()
            except fk.FusionError as error:
                got[isa] = f"{type(error).__name__}: {error}"
            finally:
                lib.set_isa(previous)
        if isinstance(got["avx2"], str) or isinstance(got["avx512"], str):
            assert got["avx512"] == got["avx2"], name
            continue
        pairs = zip(*(v if isinstance(v, tuple) else (v,) for v in got.values()), strict=True)
        same = [
            torch.equal(a, b)
            or (
                a.is_floating_point()
                and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
            )
            if isinstance(a, torch.Tensor)
            else a == b
            for a, b in pairs
        ]
        assert all(same), name
