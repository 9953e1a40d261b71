"""cast: every backend against ``tensor.to`` bit for bit on every pair of dtypes (odd, empty and
strided shapes; infinities, NaN, subnormals, overflow and halfway cases), out=, bad input."""

import pytest
import torch
from helpers import DTYPES, assert_refused, device, randn

import fusion_kernels as fk
from fusion_kernels.errors import AliasError, ArgumentTypeError, DeviceError, DTypeError, ShapeError

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
PAIRS = [(a, b) for a in DTYPES for b in DTYPES]
PAIR_IDS = [f"{a}-{b}" for a in DT_IDS for b in DT_IDS]


def _values(shape, dtype, seed=0):
    """Normal values over many binades, and where there is room the hard ones: ±inf, NaN, ±0, the
    subnormals and the overflow of the 16-bit formats, and halfway cases between their neighbours."""
    x = randn(shape, torch.float64, seed) * torch.exp2(torch.randint(-30, 30, shape, dtype=torch.float64)).to(device())
    special = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-7, -3e-8, 6e-5, 1e-39, 7e4, 1e5, -7e38]
    special += [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 2049.0, 2051.0, 257.0, -259.0]
    flat = x.view(-1)
    k = min(len(special), flat.numel())
    flat[:k] = torch.tensor(special[:k], dtype=torch.float64)
    return x.to(dtype)


def _same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN where NaN (its payload may differ)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(got[keep], expected[keep])


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,), ()])
def test_backend_equals_tensor_to(backend, src, dst, shape):
    x = _values(shape, src, seed=1)
    _same(fk.cast(x, dst), x.to(dst))


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=PAIR_IDS)
def test_strided_input_and_out_and_the_callers_tensor_untouched(backend, src, dst):
    x = _values((16, 40), src, seed=2)
    before = x.clone()
    expected = x[:, ::3].to(dst)
    _same(fk.cast(x[:, ::3], dst), expected)
    out = torch.full((14, 20), 7.0, dtype=dst, device=x.device)
    assert fk.cast(x[:, ::3], dst, out=out.t()[:16]) is not None  # out: a strided view
    _same(out.t()[:16], expected)
    assert (out.t()[16:] == 7).all()
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


def test_out_is_returned_filled(backend):
    x = _values((257,), torch.bfloat16, seed=3)
    out = torch.empty(257, dtype=torch.float16, device=x.device)
    assert fk.cast(x, torch.float16, out=out) is out
    _same(out, x.to(torch.float16))


def test_bad_input_is_refused():
    assert_refused(lambda x: fk.cast(x.long(), torch.float16), DTypeError, "'x'")
    assert_refused(lambda x: fk.cast(x, torch.int32), DTypeError, "'dtype'")
    assert_refused(lambda x: fk.cast(x, "float16"), ArgumentTypeError, "'dtype'")
    assert_refused(lambda x: fk.cast(x.tolist(), torch.float16), ArgumentTypeError, "'x'")
    assert_refused(lambda x: fk.cast(x, torch.float16, out=torch.empty(4, 3, dtype=torch.float16)), ShapeError, "'out'")
    assert_refused(lambda x: fk.cast(x, torch.float16, out=torch.empty_like(x)), DTypeError, "'out'")
    assert_refused(lambda x: fk.cast(x, torch.float16, out=x.view(torch.float16)[:, :4]), AliasError, "'out'")
    assert_refused(
        lambda x: fk.cast(x, torch.float16, out=torch.empty(3, 4, dtype=torch.float16, device="meta")),
        DeviceError,
        "'out'",
    )


def test_opcheck():
    x = torch.randn(5, 6).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.fusion_kernels.cast_out.default, (x, torch.empty(5, 6, dtype=torch.float16)))
