"""nearswap: the reference against mergekit's formula written out, every backend against the
reference (dtypes; odd, empty and strided shapes; both lerp branches and the clamp), NaN, bad input."""

import pytest
import torch
from helpers import DTYPES, assert_refused, assert_within_reference_error, randn

import fusion_kernels as fk
from fusion_kernels import methods
from fusion_kernels.reference import composite

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _pair(shape, dtype, seed=0):
    """Offsets from 0 to 3·t around the base: below t (x taken), above (interpolated), and equal."""
    base = randn(shape, torch.float64, seed)
    offset = 0.03 * torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x = base + offset.to(base.device)
    if base.numel() > 2:
        x.view(-1)[0] = base.view(-1)[0]
    return base.to(dtype), x.to(dtype)


def test_reference_matches_mergekits_formula():
    base, x = _pair((9, 31), torch.float64)
    w = (0.01 / (base - x).abs()).nan_to_num(nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)  # mergekit's steps
    torch.testing.assert_close(composite.nearswap(base, x, 0.01), w * x + (1 - w) * base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,)])
def test_backend_matches_reference(backend, dtype, shape):
    base, x = _pair(shape, dtype, seed=2)
    got = fk.nearswap(base, x, 0.01)
    assert got.dtype == dtype and got.shape == base.shape
    assert_within_reference_error(got, composite.nearswap, base, x, 0.01)
    if backend == "cpu":  # the same operations, the lerp's fused multiply-adds included
        assert torch.equal(got.cpu(), composite.nearswap(base.cpu(), x.cpu(), 0.01))


def test_nan_stays_nan(backend):
    base, x = _pair((64,), torch.float32, seed=3)
    x[5], base[9] = float("nan"), float("nan")
    got = fk.nearswap(base, x, 0.01).cpu()
    assert got.isnan().nonzero().flatten().tolist() == [5, 9]


def test_strided_inputs_and_caller_tensors_untouched(backend):
    base, x = _pair((8, 40), torch.bfloat16, seed=4)
    before = (base.clone(), x.clone())
    got = fk.nearswap(base[:, ::2], x[:, ::2], 0.01)
    assert torch.equal(got, fk.nearswap(base[:, ::2].contiguous(), x[:, ::2].contiguous(), 0.01))
    assert torch.equal(base, before[0]) and torch.equal(x, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_is_written_in_place(backend, dtype):
    """out= gives the plain call's values in the caller's tensor, which may be base or x itself;
    a strided out gets them too."""
    base, x = _pair((33, 129), dtype, seed=6)
    expected = fk.nearswap(base, x, 0.01)
    out = torch.full_like(base, float("nan"))
    assert fk.nearswap(base, x, 0.01, out=out) is out and torch.equal(out, expected)
    for which in (0, 1):
        pair = [base.clone(), x.clone()]
        assert torch.equal(fk.nearswap(*pair, 0.01, out=pair[which]), expected)
    wide = torch.zeros(33, 258, dtype=dtype, device=base.device)
    fk.nearswap(base, x, 0.01, out=wide[:, ::2])
    assert torch.equal(wide[:, ::2], expected) and not wide[:, 1::2].any()


def test_pipeline_method_runs_on_it():
    base, x = _pair((65, 33), torch.bfloat16, seed=5)
    assert torch.equal(methods.merge_tensor("nearswap", base, [x], {"t": 0.01}, seed=0), fk.nearswap(base, x, 0.01))


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.nearswap(a, a[:2], 0.1), fk.ShapeError, "'x'"),
        (lambda a: fk.nearswap(a, a.half(), 0.1), fk.DTypeError, "'x'"),
        (lambda a: fk.nearswap(a.int(), a.int(), 0.1), fk.DTypeError, "'base'"),
        (lambda a: fk.nearswap(a, a, -0.1), fk.WeightError, "'t'"),
        (lambda a: fk.nearswap(a, a, float("inf")), fk.WeightError, "'t'"),
        (lambda a: fk.nearswap(a, a.clone(), 0.1, out=a.half()), fk.DTypeError, "'out'"),
        (lambda a: fk.nearswap(a, a.clone(), 0.1, out=a[1:].clone()), fk.ShapeError, "'out'"),
        (lambda a: fk.nearswap(a[1:], a[:-1].clone(), 0.1, out=a[:-1]), fk.AliasError, "'out'"),
    ],
    ids=["shape", "dtype", "int", "negative-t", "inf-t", "out-dtype", "out-shape", "out-overlap"],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


def test_opcheck():
    torch.library.opcheck(torch.ops.fusion_kernels.nearswap.default, (torch.randn(5, 6), torch.randn(5, 6), 0.5))
    args = (torch.randn(5, 6), torch.randn(5, 6), 0.5, torch.empty(5, 6))
    torch.library.opcheck(torch.ops.fusion_kernels.nearswap_out.default, args)
