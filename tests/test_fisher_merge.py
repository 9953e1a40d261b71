"""fisher_merge: every backend against the reference, the reference against numpy and hand cases."""

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    assert_close,
    assert_within_reference_error,
    from_numpy64,
    inputs,
    randn,
    skip_if_interpreted,
    skip_if_reference,
    to_numpy64,
)

import fusion_kernels as fk
from fusion_kernels import reference as ref

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
SHAPES = [(), (0,), (1,), (9,), (4099,), (3, 17, 5), (127, 129)]


def fishers(n, shape, dtype, seed=100, zero_fraction=0.3):
    """Non-negative Fisher estimates with exact zeros in every model at some positions."""
    fs = [randn(shape, torch.float64, seed + i).square() for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    dead = torch.rand(shape, generator=g) < zero_fraction
    return [torch.where(dead, 0.0, f).to(dtype) for f in fs]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_matches_reference_across_shapes(backend, dtype, shape):
    xs, fs = inputs(3, shape, dtype), fishers(3, shape, dtype)
    w = [0.2, 0.5, 0.3]
    assert_within_reference_error(fk.fisher_merge(xs, fs, w), ref.fisher_merge, xs, fs, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_matches_reference_for_1_to_8_inputs(backend, dtype, n, eps):
    xs, fs = inputs(n, (1031,), dtype, seed=n), fishers(n, (1031,), dtype, seed=7 * n)
    w = [1.0 + 0.5 * i for i in range(n)]
    assert_within_reference_error(fk.fisher_merge(xs, fs, w, eps=eps), ref.fisher_merge, xs, fs, w, eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_reference_matches_numpy_float64(dtype):
    xs, fs = inputs(3, (515,), dtype), fishers(3, (515,), dtype)
    w, eps = np.array([0.5, 1.0, 2.0]), 1e-4
    x = np.stack([to_numpy64(t) for t in xs])
    f = np.stack([to_numpy64(t) for t in fs]) * w[:, None]
    den = f.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(den != 0, (f * x).sum(0) / (den + eps), (w[:, None] * x).sum(0) / w.sum())
    assert_close(ref.fisher_merge(xs, fs, list(w), eps), from_numpy64(expected, dtype))


def test_hand_worked_case_with_zero_fisher_fallback(backend):
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    fs = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    # (1*1 + 3*3) / (1 + 3) = 2.5;  no Fisher mass at [1]: the plain weighted average (2 + 4) / 2 = 3
    assert torch.equal(fk.fisher_merge(xs, fs, [1.0, 1.0]), torch.tensor([2.5, 3.0]))
    # weights 1:3 -> (1*1 + 3*3*3) / (1 + 9) = 2.8 and (2 + 3*4) / 4 = 3.5
    assert_close(fk.fisher_merge(xs, fs, [1.0, 3.0]), torch.tensor([2.8, 3.5]))


def test_equal_fisher_is_weighted_average(backend):
    xs = inputs(3, (300,), torch.float32)
    f = torch.full((300,), 0.25)
    assert_close(fk.fisher_merge(xs, [f, f, f], [1.0, 2.0, 1.0]), fk.weighted_average(xs, [1.0, 2.0, 1.0]))


def test_out_and_non_contiguous(backend):
    xs = [randn((20, 30), torch.float16, seed=i).t() for i in range(2)]
    fs = [f.t() for f in fishers(2, (20, 30), torch.float16)]
    expected = ref.fisher_merge([x.contiguous() for x in xs], [f.contiguous() for f in fs], [1.0, 1.0])
    out = xs[0]  # in place into a strided input
    fk.fisher_merge(xs, fs, out=out)
    assert_close(out, expected)


@pytest.mark.slow
def test_large_tensor_2pow24(backend):
    skip_if_interpreted(backend, "2^24 elements, one Python step per block")
    skip_if_reference(backend)
    shape = ((1 << 24) + 7,)
    xs, fs = inputs(2, shape, torch.bfloat16), fishers(2, shape, torch.bfloat16)
    assert_within_reference_error(fk.fisher_merge(xs, fs, eps=1e-8), ref.fisher_merge, xs, fs, [1.0, 1.0], 1e-8)


@pytest.mark.parametrize("op_name", ["fisher_merge", "fisher_merge_out"])
def test_opcheck(op_name):
    xs, fs = inputs(2, (4, 5), torch.float32), fishers(2, (4, 5), torch.float32)
    args = (xs, fs, [1.0, 2.0], 1e-6) + ((torch.zeros(4, 5),) if op_name.endswith("_out") else ())
    torch.library.opcheck(getattr(torch.ops.fusion_kernels, op_name).default, args)


def test_torch_compile_fullgraph():
    xs, fs = inputs(2, (8, 8), torch.float32), fishers(2, (8, 8), torch.float32)
    fn = torch.compile(
        lambda a, b, fa, fb: fk.fisher_merge([a, b], [fa, fb], eps=1e-6), backend="aot_eager", fullgraph=True
    )
    assert_close(fn(*xs, *fs), ref.fisher_merge(xs, fs, [1.0, 1.0], 1e-6))
