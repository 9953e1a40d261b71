"""magmax: the reference against the formula per element, every backend bit-exact against the
reference (dtypes; odd, empty and strided shapes; ties and NaN), bad input."""

import pytest
import torch
from helpers import DTYPES, assert_refused, randn

import fusion_kernels as fk
from fusion_kernels import reference as ref

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def test_reference_is_the_formula():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0])
    xs = [torch.tensor([1.0, 0.0, 2.5, 3.0]), torch.tensor([-1.0, 1.5, 1.0, 3.0]), torch.tensor([0.5, 1.0, 2.0, 2.0])]
    # element 0: |1| = |-1| -> the later (-1); 1: |-1| > |0.5|; 2: |-1| > |0.5|; 3: |-1| wins over 0, 0
    assert torch.equal(ref.magmax(base, xs, 0.5), torch.tensor([-0.5, 0.5, 1.5, 2.5]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,)])
def test_backend_matches_reference(backend, dtype, shape):
    base = randn(shape, dtype, 1)
    xs = [randn(shape, dtype, 2 + i, 0.5) for i in range(3)]
    xs.append(xs[1].clone())  # equal magnitudes: the later model
    got = fk.magmax(base, xs, 0.7)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got.cpu(), ref.magmax(base.cpu(), [x.cpu() for x in xs], 0.7))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_may_be_base_an_input_or_strided(backend, dtype):
    base = randn((33, 129), dtype, 1)
    xs = [randn((33, 129), dtype, 2 + i, 0.5) for i in range(3)]
    want = ref.magmax(base.cpu(), [x.cpu() for x in xs], 0.7)
    for target in ("base", "xs[1]", "strided"):
        b, ys = base.clone(), [x.clone() for x in xs]
        out = {"base": b, "xs[1]": ys[1], "strided": torch.full((33, 258), 7.0, dtype=dtype, device=b.device)[:, ::2]}[
            target
        ]
        assert fk.magmax(b, ys, 0.7, out=out) is out
        assert torch.equal(out.cpu(), want), target

    buffer = randn((2, 4100), dtype, 5)
    before = buffer.clone()
    with pytest.raises(fk.AliasError, match="'out'"):  # overlaps base without being it
        fk.magmax(buffer[0, :4099], [buffer[1, :4099]], out=buffer[0, 1:])
    with pytest.raises(fk.ShapeError, match="'out'"):
        fk.magmax(base, xs, out=base[:, 1:])
    assert torch.equal(buffer, before)


def test_nan_and_strided_inputs(backend):
    base = randn((8, 40), torch.float32, 3)
    xs = [randn((8, 40), torch.float32, 4 + i) for i in range(2)]
    xs[0][0, 0] = float("nan")
    strided = [x[:, ::2] for x in xs]
    got = fk.magmax(base[:, ::2], strided, 1.0)
    expected = ref.magmax(base[:, ::2].contiguous().cpu(), [x.contiguous().cpu() for x in strided], 1.0)
    assert torch.allclose(got.cpu(), expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.magmax(a, [a[:2]]), fk.ShapeError, "'xs[0]'"),
        (lambda a: fk.magmax(a, [a.half()]), fk.DTypeError, "'xs[0]'"),
        (lambda a: fk.magmax(a.int(), [a.int()]), fk.DTypeError, "'base'"),
        (lambda a: fk.magmax(a, [a], float("inf")), fk.WeightError, "'lam'"),
        (lambda a: fk.magmax(a, []), fk.ShapeError, "'xs'"),
    ],
    ids=["shape", "dtype", "int", "lam", "empty"],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


def test_opcheck():
    base, xs = torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)]
    torch.library.opcheck(torch.ops.fusion_kernels.magmax.default, (base, xs, 0.5))
    torch.library.opcheck(torch.ops.fusion_kernels.magmax_out.default, (base, xs, 0.5, torch.zeros(5, 6)))
