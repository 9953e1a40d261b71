"""slerp: hand cases, the reference against numpy float64, parity with mergekit 0.1.5, bad input."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    assert_close,
    assert_within_reference_error,
    from_numpy64,
    randn,
    set_isa,
    to_numpy64,
    torch_threads,
)

import fusion_kernels as fk
from fusion_kernels import reference as ref

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def test_orthogonal_unit_vectors(backend):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    assert_close(fk.slerp(a, b, 0.5), torch.tensor([half, half]))
    assert_close(fk.slerp(a, b, 0.0), a)
    assert_close(fk.slerp(a, b, 1.0), b)


def test_parallel_inputs_interpolate_linearly(backend):
    a = torch.tensor([1.0, 2.0, 3.0])
    assert_close(fk.slerp(a, 2 * a, 0.25), 1.25 * a)
    # a zero norm counts as 1, so the dot is 0, θ = π/2 and a's coefficient is sin(π/4)
    assert_close(fk.slerp(a, torch.zeros(3), 0.5), math.sqrt(0.5) * a)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rowwise", [False, True])
def test_reference_matches_numpy_float64(dtype, rowwise):
    a, b = randn((7, 33), dtype, seed=1), randn((7, 33), dtype, seed=2)
    t = 0.3
    x, y = to_numpy64(a), to_numpy64(b)
    xs, ys = (x, y) if rowwise else (x.reshape(1, -1), y.reshape(1, -1))
    na, nb = np.linalg.norm(xs, axis=1, keepdims=True), np.linalg.norm(ys, axis=1, keepdims=True)
    theta = np.arccos(np.clip((xs / na * ys / nb).sum(1, keepdims=True), -1, 1))
    expected = (np.sin((1 - t) * theta) * xs + np.sin(t * theta) * ys) / np.sin(theta)
    got = ref.slerp(a, b, [t], rowwise=rowwise, dot_threshold=0.9995, eps=1e-8)
    assert_close(got, from_numpy64(expected.reshape(a.shape), dtype))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_backend_matches_reference(backend, dtype):
    a, b = randn((64, 129), dtype, seed=3), randn((64, 129), dtype, seed=4)
    for rowwise in (False, True):
        got = fk.slerp(a, b, 0.7, rowwise=rowwise)
        assert_within_reference_error(got, ref.slerp, a, b, [0.7], rowwise=rowwise, dot_threshold=0.9995, eps=1e-8)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_isas_give_the_same_bits(dtype):
    """The AVX2 kernel sums and combines in the portable kernel's order and roundings (a fused
    multiply-add only for the sums' exact products): equal bits, over several blocks, odd tails and
    per-row factors."""
    from fusion_kernels import _native

    if _native.unavailable_reason() or "avx2" not in _native.lib().supported_isas():
        pytest.skip("no avx2 kernels in this build or on this CPU")
    a, b = randn((3, 70001), dtype, seed=8), randn((3, 70001), dtype, seed=9)
    for rowwise, t in ((False, 0.3), (True, [0.1, 0.5, 0.9])):
        got = {}
        for isa in ("avx2", "portable"):
            with fk.use_backend("cpu"), set_isa(isa):
                got[isa] = fk.slerp(a, b, t, rowwise=rowwise)
        assert torch.equal(got["avx2"], got["portable"]), rowwise


@pytest.mark.parametrize("rowwise", [False, True])
def test_threads_give_the_same_bits(rowwise):
    """The sums' blocks (a few dozen: every thread gets some) are added in block order and the
    combine is elementwise: 1, 2 and 3 threads give equal bits."""
    a, b = randn((4, 150001), torch.float32, seed=5), randn((4, 150001), torch.float32, seed=6)
    got = []
    with fk.use_backend("cpu"):
        for n in (1, 2, 3):
            with torch_threads(n):
                got.append(fk.slerp(a, b, 0.4, rowwise=rowwise))
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_rowwise_matches_mergekit():
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed: pip install --no-deps mergekit==0.1.5")
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a, b = randn((16, 40), torch.float32, seed=5), randn((16, 40), torch.float32, seed=6)
    b[3] = 2 * a[3]  # one parallel row takes the linear branch
    t = torch.linspace(0, 1, 16)
    expected = mergekit_slerp(t, a, b)
    assert_close(fk.slerp(a, b, t, rowwise=True), expected)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
@pytest.mark.parametrize("rowwise", [False, True])
def test_out_is_written_in_place(backend, dtype, rowwise):
    """out= gives the plain call's values in the caller's tensor, which may be a or b itself."""
    a, b = randn((33, 129), dtype, seed=31), randn((33, 129), dtype, seed=32)
    expected = fk.slerp(a, b, 0.3, rowwise=rowwise)
    out = torch.full_like(a, float("nan"))
    assert fk.slerp(a, b, 0.3, rowwise=rowwise, out=out) is out and torch.equal(out, expected)
    for which in (0, 1):
        pair = [a.clone(), b.clone()]
        assert torch.equal(fk.slerp(*pair, 0.3, rowwise=rowwise, out=pair[which]), expected)


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.slerp(a, a[:2], 0.5), fk.ShapeError, "'b'"),
        (lambda a: fk.slerp(a, a.half(), 0.5), fk.DTypeError, "'b'"),
        (lambda a: fk.slerp(a, a, float("nan")), fk.WeightError, "'t'"),
        (lambda a: fk.slerp(a, a, [0.5, 0.5], rowwise=True), fk.WeightError, "'t'"),
        (lambda a: fk.slerp(a.int(), a.int(), 0.5), fk.DTypeError, "'a'"),
        (lambda a: fk.slerp(a, a, 0.5, dot_threshold=2.0), fk.WeightError, "dot_threshold"),
        (lambda a: fk.slerp(a, a, 0.5, out=a.half()), fk.DTypeError, "'out'"),
        (lambda a: fk.slerp(a[1:], a[:-1].clone(), 0.5, out=a[:-1]), fk.AliasError, "'out'"),
    ],
    ids=["shape", "dtype", "nan-t", "t-count", "int", "threshold", "out-dtype", "out-overlap"],
)
def test_bad_input(call, error, argument):
    with pytest.raises(error) as info:
        call(torch.randn(3, 4))
    assert argument in str(info.value)


def test_opcheck():
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    torch.library.opcheck(torch.ops.fusion_kernels.slerp.default, (a, b, [0.4], False, 0.9995, 1e-8))
    args = (a, b, [0.4], False, 0.9995, 1e-8, torch.empty(5, 6))
    torch.library.opcheck(torch.ops.fusion_kernels.slerp_out.default, args)
