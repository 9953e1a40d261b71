"""task_arithmetic: every backend against the reference, the reference against numpy and a hand case."""

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


ADD_BASE = pytest.mark.parametrize("add_base", [True, False], ids=["with-base", "sum-alone"])


def _check(got, base, xs, w, add_base):
    """The tolerance rule, its ulps those of the largest term wᵢ·(xᵢ − base) or partial sum: without
    the base, the sum may cancel to far less than the terms it rounded."""
    b = base.double()
    terms = [wi * (x.double() - b) for wi, x in zip(w, xs, strict=True)]
    partial = torch.stack([b * add_base + sum(terms[: i + 1]) for i in range(len(terms))]) if terms else b
    sizes = [partial.abs().flatten(), b.abs().flatten() * add_base, torch.zeros(1, dtype=torch.float64)]
    magnitude = float(torch.cat(sizes).max())
    assert_within_reference_error(got, lambda *a: ref.task_arithmetic(*a, add_base), base, xs, w, magnitude=magnitude)


@ADD_BASE
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_matches_reference_across_shapes(backend, dtype, shape, add_base):
    base, *xs = inputs(4, shape, dtype)
    w = [0.3, -0.7, 1.1]
    _check(fk.task_arithmetic(base, xs, w, add_base=add_base), base, xs, w, add_base)


@ADD_BASE
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", range(1, 9))
def test_matches_reference_for_1_to_8_inputs(backend, dtype, n, add_base):
    base, *xs = inputs(n + 1, (1031,), dtype, seed=10 * n)
    w = [0.2 * (i + 1) * (-1) ** i for i in range(n)]
    _check(fk.task_arithmetic(base, xs, w, add_base=add_base), base, xs, w, add_base)


def test_hand_worked_case(backend):
    base = torch.tensor([1.0, 0.0, -2.0])
    xs = [torch.tensor([3.0, 1.0, -2.0]), torch.tensor([-1.0, 4.0, 0.0])]
    # 1 + 0.5*2 + 0.25*(-2) = 1.5;  0 + 0.5*1 + 0.25*4 = 1.5;  -2 + 0 + 0.25*2 = -1.5
    assert torch.equal(fk.task_arithmetic(base, xs, [0.5, 0.25]), torch.tensor([1.5, 1.5, -1.5]))
    # without the base: 0.5*2 + 0.25*(-2) = 0.5;  0.5*1 + 0.25*4 = 1.5;  0 + 0.25*2 = 0.5
    assert torch.equal(fk.task_arithmetic(base, xs, [0.5, 0.25], add_base=False), torch.tensor([0.5, 1.5, 0.5]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sum_alone_is_torchs_sum_of_task_vectors_bit_for_bit(backend, dtype):
    """Unit weights, add_base=False: (x₁ − b) + (x₂ − b) + … in the accumulation dtype, in model order,
    from zero (so −0 task vectors sum to +0, as Python's sum from 0 does)."""
    base, *xs = inputs(9, (70001,), dtype, seed=3)
    xs[2] = base.clone()  # a task vector of zeros
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = sum(x.to(wide) - base.to(wide) for x in xs).to(dtype)
    got = fk.task_arithmetic(base, xs, add_base=False)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(fk.task_arithmetic(base, [base], add_base=False)), torch.signbit(base * 0 + 0))


@ADD_BASE
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_reference_matches_numpy_float64(dtype, add_base):
    base, *xs = inputs(4, (257,), dtype)
    w = [0.4, 0.0, -0.6]
    b = to_numpy64(base)
    expected = b * add_base + sum(wi * (to_numpy64(x) - b) for wi, x in zip(w, xs, strict=True))
    assert_close(ref.task_arithmetic(base, xs, w, add_base), from_numpy64(expected, dtype))


@ADD_BASE
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_may_alias_base_or_an_input(backend, dtype, add_base):
    base, *xs = inputs(3, (777,), dtype)
    expected = ref.task_arithmetic(base, xs, [0.5, 0.5], add_base)
    b, x0 = base.clone(), xs[0].clone()
    fk.task_arithmetic(b, [x0, xs[1]], [0.5, 0.5], out=b, add_base=add_base)
    assert_close(b, expected)
    b = base.clone()
    fk.task_arithmetic(b, [x0, xs[1]], [0.5, 0.5], out=x0, add_base=add_base)
    assert_close(x0, expected)


def test_non_contiguous(backend):
    base, *xs = [randn((30, 50), torch.bfloat16, seed=i).t() for i in range(3)]
    assert_close(
        fk.task_arithmetic(base, xs, 0.3),
        ref.task_arithmetic(base.contiguous(), [x.contiguous() for x in xs], [0.3, 0.3]),
    )


@pytest.mark.slow
def test_large_tensor_2pow24(backend):
    skip_if_interpreted(backend, "2^24 elements, one Python step per block")
    skip_if_reference(backend)
    base, *xs = inputs(3, ((1 << 24) + 5,), torch.bfloat16)
    assert_within_reference_error(fk.task_arithmetic(base, xs, [0.6, 0.4]), ref.task_arithmetic, base, xs, [0.6, 0.4])


@ADD_BASE
def test_autograd(add_base):
    base, *xs = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    torch.autograd.gradcheck(lambda b, *t: fk.task_arithmetic(b, list(t), [0.3, 0.9], add_base=add_base), (base, *xs))


@ADD_BASE
@pytest.mark.parametrize("op_name", ["task_arithmetic", "task_arithmetic_out"])
def test_opcheck(op_name, add_base):
    base, *xs = inputs(3, (4, 5), torch.float32)
    args = (base, xs, [0.1, 0.2], add_base) + ((torch.zeros(4, 5),) if op_name.endswith("_out") else ())
    torch.library.opcheck(getattr(torch.ops.fusion_kernels, op_name).default, args)


@pytest.mark.parametrize("bad", [1, None, "no"], ids=str)
def test_add_base_must_be_a_bool(bad):
    base, x = inputs(2, (3,), torch.float32)
    with pytest.raises(fk.ArgumentTypeError, match="'add_base' expected a bool"):
        fk.task_arithmetic(base, [x], add_base=bad)


def test_torch_compile_fullgraph():
    base, x = inputs(2, (8, 8), torch.float32)
    fn = torch.compile(lambda b, y: fk.task_arithmetic(b, [y], 0.5), backend="aot_eager", fullgraph=True)
    assert_close(fn(base, x), ref.task_arithmetic(base, [x], [0.5]))
