"""weighted_sum / weighted_average: every backend against the reference, the reference against numpy."""

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    assert_close,
    assert_within_reference_error,
    device,
    from_numpy64,
    inputs,
    randn,
    skip_if_interpreted,
    skip_if_reference,
    to_numpy64,
)

import fusion_kernels as fk
from fusion_kernels import reference as ref

SHAPES = [(), (0,), (1,), (7,), (33,), (4099,), (3, 17, 5), (0, 4), (127, 129)]
DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def shape_id(shape):
    return "x".join(map(str, shape)) or "scalar"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference_across_shapes(backend, dtype, shape):
    xs = inputs(3, shape, dtype)
    w = [0.5, -1.25, 2.0]
    assert_within_reference_error(fk.weighted_sum(xs, w), ref.weighted_sum, xs, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", range(1, 9))
def test_matches_reference_for_1_to_8_inputs(backend, dtype, n):
    xs = inputs(n, (1031,), dtype, seed=n)
    w = [(-1) ** i * (0.3 + 0.1 * i) for i in range(n)]
    assert_within_reference_error(fk.weighted_sum(xs, w), ref.weighted_sum, xs, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_reference_matches_numpy_float64(dtype):
    xs = inputs(4, (257,), dtype)
    w = [0.1, 0.7, -0.3, 0.0]
    expected = sum(wi * to_numpy64(x) for wi, x in zip(w, xs, strict=True))
    assert_close(ref.weighted_sum(xs, w), from_numpy64(expected, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_weighted_average_normalises(backend, dtype):
    xs = inputs(3, (65,), dtype)
    got = fk.weighted_average(xs, [1.0, 2.0, 5.0])
    expected = sum(w / 8.0 * to_numpy64(x) for w, x in zip([1.0, 2.0, 5.0], xs, strict=True))
    assert_close(got, from_numpy64(expected, dtype))
    uniform = fk.weighted_average(xs)
    assert_close(uniform, from_numpy64(np.mean([to_numpy64(x) for x in xs], axis=0), dtype))


@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, [1.0, 1.0, 1.0]),
        (0.5, [0.5, 0.5, 0.5]),
        (torch.tensor(2.0), [2.0, 2.0, 2.0]),
        (torch.tensor([0.0, -1.0, 3.0]), [0.0, -1.0, 3.0]),
        ((1, 2, 3), [1.0, 2.0, 3.0]),
    ],
    ids=["none", "float-broadcast", "0d-tensor-broadcast", "tensor-zero-negative", "int-tuple"],
)
def test_weight_forms(backend, weights, expected):
    xs = inputs(3, (100,), torch.float32)
    assert_within_reference_error(fk.weighted_sum(xs, weights), ref.weighted_sum, xs, expected)


def test_stacked_input_equals_list(backend):
    xs = inputs(4, (3, 50), torch.bfloat16)
    w = [0.25, 0.25, 0.5, -1.0]
    assert torch.equal(fk.weighted_sum(torch.stack(xs), w), fk.weighted_sum(xs, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_non_contiguous_inputs_and_out(backend, dtype):
    base = [randn((40, 60), dtype, seed=i) for i in range(3)]
    views = [base[0].t(), base[1][:, ::2].repeat(1, 2).t(), base[2].t()]  # transposed and strided
    w = [1.0, 0.5, -0.25]
    expected = ref.weighted_sum([v.contiguous() for v in views], w)
    assert_close(fk.weighted_sum(views, w), expected)
    out_storage = torch.zeros(60, 80, dtype=dtype)
    out = out_storage[:, ::2]  # strided out
    fk.weighted_sum(views, w, out=out)
    assert_close(out, expected)
    assert torch.all(out_storage[:, 1::2] == 0), "wrote outside the out view"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_and_in_place(backend, dtype):
    xs = inputs(3, (513,), dtype)
    w = [0.2, 0.3, 0.5]
    expected = ref.weighted_sum(xs, w)
    originals = [x.clone() for x in xs]
    out = torch.empty_like(xs[0])
    assert fk.weighted_sum(xs, w, out=out) is out
    assert_close(out, expected)
    for x, x0 in zip(xs, originals, strict=True):
        assert torch.equal(x, x0), "an input was modified"
    fk.weighted_sum(xs, w, out=xs[0])  # out aliases the first input exactly
    assert_close(xs[0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_rounding_is_bit_exact(backend, dtype):
    """x + y is exact in float32 for these inputs, so the result tests only the final rounding."""
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            float("-inf"),
            float("nan"),
            info.max,
            -info.max,
            info.tiny,
            info.tiny / 4,  # subnormal
            info.eps,
            1.0,
            -1.0,
        ],
        dtype=torch.float32,
    ).to(dtype)
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        # Triton 3.9's interpreter flushes bfloat16 subnormals to zero when it converts them to
        # float32 (its _convert_float clamps the exponent); a GPU converts them exactly.
        specials = specials[specials.abs() != info.tiny / 4]
    x = torch.cat([randn((1001,), dtype, seed=1), specials, specials])
    y = torch.cat([randn((1001,), dtype, seed=2), specials, specials.flip(0)])
    got = fk.weighted_sum([x, y], [1.0, 1.0])
    expected = (x.float() + y.float()).to(dtype)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_bfloat16_halfway_values_round_to_nearest_even(backend):
    # 1 + 3·2⁻⁸ lies halfway between two bfloat16 values: to nearest even it goes up, truncation
    # (Triton's interpreter's own conversion) would go down. The others sit just beside such ties.
    a = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.bfloat16, device=device())
    b = torch.tensor([3 * 2**-8, -3 * 2**-8, 2**-8, 3 * 2**-8 + 2**-14], dtype=torch.bfloat16, device=device())
    got = fk.weighted_sum([a, b], [1.0, 1.0])
    assert torch.equal(got, (a.float() + b.float()).to(torch.bfloat16))
    assert got[0].item() == 1.0 + 2**-6


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_single_input_weight_one_is_identity(backend, dtype):
    x = randn((999,), dtype, seed=3)
    assert torch.equal(fk.weighted_sum([x], [1.0]), x)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_large_tensor_2pow24(backend, dtype):
    skip_if_interpreted(backend, "2^24 elements, one Python step per block")
    skip_if_reference(backend)
    n = (1 << 24) + 3
    xs = inputs(2, (n,), dtype)
    assert_within_reference_error(fk.weighted_sum(xs, [0.75, -0.5]), ref.weighted_sum, xs, [0.75, -0.5])


def test_threads_do_not_change_bits():
    xs = inputs(3, (300_001,), torch.bfloat16)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fk.weighted_sum(xs, [0.1, 0.2, 0.7]))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_autograd():
    xs = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = [0.5, -2.0, 1.5]
    torch.autograd.gradcheck(lambda *t: fk.weighted_sum(list(t), w), xs)


@pytest.mark.parametrize("op_name", ["weighted_sum", "weighted_sum_out"])
def test_opcheck(op_name):
    xs = inputs(3, (4, 5), torch.float32)
    args = (xs, [0.1, 0.2, 0.3]) + ((torch.zeros(4, 5),) if op_name.endswith("_out") else ())
    torch.library.opcheck(getattr(torch.ops.fusion_kernels, op_name).default, args)


def test_torch_compile_fullgraph():
    xs = inputs(2, (8, 8), torch.float32)
    fn = torch.compile(lambda a, b: fk.weighted_average([a, b], [1.0, 3.0]) * 2, backend="aot_eager", fullgraph=True)
    assert_close(fn(*xs), 2 * ref.weighted_sum(xs, [0.25, 0.75]))
