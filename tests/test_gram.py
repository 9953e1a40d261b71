"""gram: the reference against numpy float64, every backend against the reference (dtypes, rows,
odd, empty and strided shapes), the Gram-based spherical methods against their references, bad input."""

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_close, assert_peer_close, inputs, randn, set_isa, to_numpy64, torch_threads

import fusion_kernels as fk
from fusion_kernels import methods, spherical
from fusion_kernels import reference as ref
from fusion_kernels.reference import composite

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _numpy_gram(xs, base, rows):
    d = np.stack([to_numpy64(x).reshape(rows, -1) for x in xs])
    if base is not None:
        d = d - to_numpy64(base).reshape(rows, -1)
    return np.einsum("irc,jrc->rij", d, d)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [False, True])
def test_reference_matches_numpy_float64(dtype, with_base):
    xs, base = inputs(3, (6, 35), dtype), randn((6, 35), dtype, seed=9)
    b = base if with_base else None
    for rows in (1, 6, 210):
        expected = torch.from_numpy(_numpy_gram(xs, b, rows))
        assert_close(ref.gram(xs, b, rows).cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape, rows", [((4097,), 1), ((33, 129), 33), ((3, 5, 7), 15), ((0, 8), 1), ((1,), 1)])
def test_backend_matches_reference(backend, dtype, shape, rows):
    """Both sum the same products in float64, in other orders: equal within float64 rounding."""
    xs, base = inputs(4, shape, dtype, seed=1), randn(shape, dtype, seed=7)
    for b in (None, base):
        got = fk.gram(xs, b, rows=rows)
        assert got.dtype == torch.float64 and got.shape == (rows, 4, 4)
        assert_close(got.cpu(), ref.gram(xs, b, rows).cpu())
        assert torch.equal(got, got.transpose(1, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_isas_add_in_the_same_order(dtype):
    """The AVX2 kernel (registers only, for up to three inputs) adds the same products in the same
    order as the portable one: equal bits, over odd lengths, several blocks and rows."""
    from fusion_kernels import _native

    if _native.unavailable_reason() or "avx2" not in _native.lib().supported_isas():
        pytest.skip("no avx2 kernels in this build or on this CPU")
    for n in (1, 2, 3, 4):
        xs, base = inputs(n, (3, 40011), dtype, seed=n), randn((3, 40011), dtype, seed=11)
        for b in (None, base):
            for rows in (1, 3):
                got = {}
                for isa in ("avx2", "portable"):
                    with fk.use_backend("cpu"), set_isa(isa):
                        got[isa] = fk.gram(xs, b, rows=rows)
                assert torch.equal(got["avx2"], got["portable"]), (n, b is not None, rows)
                assert_close(got["avx2"], ref.gram(xs, b, rows))


def test_threads_share_the_blocks_and_keep_the_bits():
    """The blocks' sums are handed out to the threads (a few dozen blocks reach every thread) and
    added in block order: 1, 2 and 3 threads give equal bits."""
    xs, base = inputs(2, (5, 70001), torch.float32, seed=4), randn((5, 70001), torch.float32, seed=5)
    for b in (None, base):
        for rows in (1, 5):
            with fk.use_backend("cpu"):
                got = []
                for n in (1, 2, 3):
                    with torch_threads(n):
                        got.append(fk.gram(xs, b, rows=rows))
            assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2]), (b is not None, rows)


def test_strided_and_stacked_inputs(backend):
    wide = randn((8, 40), torch.float32, seed=2)
    xs = [wide[:, ::2], wide[:, 1::2]]  # non-contiguous
    assert_close(fk.gram(xs).cpu(), ref.gram([x.contiguous() for x in xs], None, 1).cpu())
    stacked = torch.stack([x.contiguous() for x in xs])
    assert torch.equal(fk.gram(stacked), fk.gram(xs))


def test_long_sums_keep_float64_digits(backend):
    """2^22 bf16 elements: the float64 sums keep the cosine of two nearly parallel vectors to 1e-12."""
    x = randn((1 << 22,), torch.bfloat16, seed=3)
    y = (x.double() + 1e-2 * randn((1 << 22,), torch.float64, seed=4)).to(torch.bfloat16)
    g = fk.gram([x, y])[0].cpu()
    exact = torch.from_numpy(_numpy_gram([x, y], None, 1)[0])
    cos, cos_exact = g[0, 1] / (g[0, 0] * g[1, 1]).sqrt(), exact[0, 1] / (exact[0, 0] * exact[1, 1]).sqrt()
    assert abs(float(cos - cos_exact)) < 1e-12


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.gram([a, a[:2]]), fk.ShapeError, "'xs[1]'"),
        (lambda a: fk.gram([a, a.half()]), fk.DTypeError, "'xs[1]'"),
        (lambda a: fk.gram([a], a.double()), fk.DTypeError, "'base'"),
        (lambda a: fk.gram([a.int()]), fk.DTypeError, "'xs[0]'"),
        (lambda a: fk.gram([a], rows=5), fk.ShapeError, "'rows'"),
        (lambda a: fk.gram([a], rows=0), fk.ShapeError, "'rows'"),
        (lambda a: fk.gram([]), fk.ShapeError, "'xs'"),
    ],
    ids=["shape", "dtype", "base-dtype", "int", "rows-divide", "rows-zero", "empty"],
)
def test_bad_input(call, error, argument):
    with pytest.raises(error) as info:
        call(torch.randn(3, 4))
    assert argument in str(info.value)


def test_opcheck():
    xs, base = [torch.randn(5, 6), torch.randn(5, 6)], torch.randn(5, 6)
    torch.library.opcheck(torch.ops.fusion_kernels.gram.default, (xs, base, 5))
    torch.library.opcheck(torch.ops.fusion_kernels.gram.default, (xs, None, 1))


# The spherical methods from the Gram matrix against their references (which make passes over
# the vectors themselves), on every dtype; the references against mergekit: test_mergekit_methods.
def _family(dtype, n=3, shape=(37, 23), seed=0):
    base = randn(shape, torch.float64, seed)
    xs = [base + 0.3 * randn(shape, torch.float64, seed + 1 + i) for i in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_spherical_methods_match_their_references(dtype):
    base, xs = _family(dtype)

    def check(got, expected):
        if dtype == torch.float32:  # the reference sums in float32, here in float64
            assert_peer_close(got, expected, "gram_vs_float32_sums")
        else:
            assert_close(got, expected)

    w = [1 / 3] * 3
    check(spherical.karcher(xs, w, 10, 1e-5), composite.karcher(xs, w, max_iter=10, tol=1e-5))
    check(spherical.multislerp(xs, None, [0.2, 0.3, 0.5], True, 1e-8), composite.multislerp(xs, [0.2, 0.3, 0.5]))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    tvs = [x.to(wide) - base.to(wide) for x in xs]
    expected = (base.to(wide) + composite.multislerp(tvs, [1.0, 1.0, 2.0])).to(dtype)
    check(spherical.multislerp(xs, base, [1.0, 1.0, 2.0], True, 1e-8), expected)
    expected = (base.to(wide) + composite.nuslerp(0.3, tvs[0], tvs[1])).to(dtype)
    check(spherical.nuslerp(0.3, xs[:2], base), expected)
    check(spherical.nuslerp(0.7, xs[:2], None), composite.nuslerp(0.7, xs[0], xs[1]))


def test_spherical_edge_cases():
    base, xs = _family(torch.float32)
    assert_close(spherical.nuslerp(0.25, [xs[0], 2 * xs[0]], None), 1.25 * xs[0])  # parallel: linear
    zero = torch.zeros_like(xs[0])
    assert torch.equal(spherical.karcher([zero, zero], [0.5, 0.5], 10, 1e-5), zero)  # no valid vector
    with pytest.raises(fk.WeightError, match="antipodal"):
        spherical.multislerp([xs[0], -xs[0], xs[0] - xs[0]], None, [1.0, 1.0, 0.0], True, 1e-8)
    merged = methods.merge_tensor("karcher", None, xs, {"max_iter": 10, "tol": 1e-5}, seed=0)
    assert_peer_close(merged, composite.karcher(xs, [1 / 3] * 3, max_iter=10, tol=1e-5), "gram_vs_float32_sums")
