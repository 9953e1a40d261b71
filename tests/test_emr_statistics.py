"""emr_statistics: the reference against EMR's formula per element, every backend against the
reference (dtypes; odd, empty and strided shapes), bad input."""

import pytest
import torch
from helpers import assert_refused, randn

import fusion_kernels as fk
from fusion_kernels import reference as ref

DTYPES3 = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES3]


def test_reference_is_the_formula():
    base = torch.zeros(4)
    xs = [
        torch.tensor([1.0, -2.0, 0.5, 0.0]),
        torch.tensor([-3.0, 1.0, 0.25, 0.0]),
        torch.tensor([2.0, -1.0, -1.0, 0.0]),
    ]
    unified, masks, sums = ref.emr_statistics(base, xs)
    # sums 0, -2, -0.25, 0: σ = -1 everywhere (a zero sum counts as negative)
    assert torch.equal(unified, torch.tensor([-3.0, -2.0, -1.0, 0.0]))
    assert masks.tolist() == [[False, True, False, False], [True, False, False, False], [False, True, True, False]]
    assert sums[:, 0].tolist() == [3.5, 4.25, 4.0] and sums[:, 1].tolist() == [2.0, 3.0, 3.0]


@pytest.mark.parametrize("dtype", DTYPES3, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 1, 7), (0, 8), (1,)])
def test_backend_matches_reference(backend, dtype, shape):
    base = randn(shape, dtype, 1)
    xs = [randn(shape, dtype, 2 + i, 0.5) for i in range(4)]
    unified, masks, sums = fk.emr_statistics(base, xs)
    want_u, want_m, want_s = ref.emr_statistics(base.cpu(), [x.cpu() for x in xs])
    assert unified.dtype == dtype and masks.shape == (4, *shape) and sums.shape == (4, 2)
    assert torch.equal(unified.cpu(), want_u) and torch.equal(masks.cpu(), want_m)
    torch.testing.assert_close(sums.cpu(), want_s, rtol=1e-6, atol=1e-6)  # float32 partial sums, other order


def test_strided_inputs(backend):
    base = randn((8, 40), torch.float32, 3)
    xs = [randn((8, 40), torch.float32, 4 + i) for i in range(2)]
    got = fk.emr_statistics(base[:, ::2], [x[:, ::2] for x in xs])
    want = ref.emr_statistics(base[:, ::2].contiguous().cpu(), [x[:, ::2].contiguous().cpu() for x in xs])
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.emr_statistics(a, [a[:2]]), fk.ShapeError, "'xs[0]'"),
        (lambda a: fk.emr_statistics(a, [a.half()]), fk.DTypeError, "'xs[0]'"),
        (lambda a: fk.emr_statistics(a.int(), [a.int()]), fk.DTypeError, "'base'"),
        (lambda a: fk.emr_statistics(a, []), fk.ShapeError, "'xs'"),
    ],
    ids=["shape", "dtype", "int", "empty"],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


def test_opcheck():
    base, xs = torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)]
    torch.library.opcheck(torch.ops.fusion_kernels.emr_statistics.default, (base, xs))
