"""ram_merge and ram_counts: the reference against the formula written out per element, every
backend bit-exact against the reference (dtypes; odd, empty and strided shapes; RAM and RAM+),
the counts, bad input."""

import pytest
import torch
from helpers import DTYPES, assert_refused, randn

import fusion_kernels as fk
from fusion_kernels import methods
from fusion_kernels.reference import composite

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _family(n, shape, dtype, seed=0, spread=1e-2):
    """A base and n tunes whose task vectors straddle epsilon = spread (about a third kept each)."""
    base = randn(shape, torch.float64, seed)
    xs = [base + spread * 2 * randn(shape, torch.float64, seed + 1 + i) for i in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def _by_element(base, xs, eps, scales):
    """RAM+ one element at a time in Python floats rounded to float32 (the formula as written)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    out = []
    for j in range(base.numel()):
        b = f32(base.reshape(-1)[j].item())
        taus = [f32(f32(x.reshape(-1)[j].item()) - b) for x in xs]
        kept = [(t, s) for t, s in zip(taus, scales, strict=True) if abs(t) > eps]
        if len(kept) == 1:
            merged = f32(kept[0][0] * f32(kept[0][1]))
        else:
            total = 0.0
            for t, _ in kept:
                total = f32(total + t)
            merged = f32(total / max(len(kept), 1))
        out.append(f32(b + merged))
    return torch.tensor(out, dtype=torch.float32).reshape(base.shape)


def test_reference_matches_the_formula():
    base, xs = _family(3, (7, 11), torch.float32)
    scales = [1.5, 1.0, 0.75]
    got = composite.ram(base.cpu(), [x.cpu() for x in xs], 1e-2, scales=scales)
    assert torch.equal(got, _by_element(base.cpu(), [x.cpu() for x in xs], 1e-2, scales))
    kept = torch.stack([(x.cpu() - base.cpu()).abs() > 1e-2 for x in xs])
    assert int((kept.sum(0) == 1).sum()) > 0 and int((kept.sum(0) > 1).sum()) > 0  # both branches taken


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,)])
@pytest.mark.parametrize("scales", [None, [1.25, 0.5, 2.0]], ids=["ram", "ramplus"])
def test_backend_matches_reference(backend, dtype, shape, scales):
    """The same float32 operations in the same order: bit-identical on every dtype."""
    base, xs = _family(3, shape, dtype, seed=1)
    got = fk.ram_merge(base, xs, 1e-2, scales)
    assert got.dtype == dtype and got.shape == base.shape
    expected = composite.ram(base.cpu(), [x.cpu() for x in xs], 1e-2, scales=scales or [1.0] * 3)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (0, 8), (1,)])
def test_counts_match_reference(backend, dtype, shape):
    base, xs = _family(4, shape, dtype, seed=2)
    got = fk.ram_counts(base, xs, 1e-2)
    assert got == composite.ram_counts(base.cpu(), [x.cpu() for x in xs], 1e-2)
    if base.numel() > 1000:  # both kinds occur, and every kept element is one of them
        assert all(shared > 0 and alone > 0 for shared, alone in got)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        kept = [int(((x.to(wide) - base.to(wide)).abs() > 1e-2).sum()) for x in xs]
        assert [s + a for s, a in got] == kept


def test_counts_across_threads_and_runs(backend):
    """Counts over many pieces (threads, 1024-element runs, a vector tail) add up exactly."""
    base, xs = _family(2, (3 * 1024 * 37 + 5,), torch.bfloat16, seed=3)
    assert fk.ram_counts(base, xs, 1e-2) == composite.ram_counts(base.cpu(), [x.cpu() for x in xs], 1e-2)


def test_strided_and_stacked_inputs(backend):
    base, xs = _family(2, (8, 40), torch.float32, seed=4)
    strided = [x[:, ::2] for x in xs]
    got = fk.ram_merge(base[:, ::2], strided, 1e-2)
    expected = composite.ram(base[:, ::2].contiguous().cpu(), [x.contiguous().cpu() for x in strided], 1e-2)
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(fk.ram_merge(base, torch.stack(xs), 1e-2), fk.ram_merge(base, xs, 1e-2))


def test_caller_tensors_untouched(backend):
    base, xs = _family(2, (64,), torch.float16, seed=5)
    before = [t.clone() for t in (base, *xs)]
    fk.ram_merge(base, xs, 1e-2, [2.0, 3.0])
    assert all(torch.equal(a, b) for a, b in zip(before, (base, *xs), strict=True))


def test_pipeline_methods_use_it():
    """mergekit's ram and ramplus_tl through the engine equal the reference on the whole tensor."""
    base, xs = _family(3, (65, 33), torch.bfloat16, seed=6)
    params = {"epsilon": 1e-2, "r": 0.5, "alpha": 0.4}
    got = methods.merge_tensor("ramplus_tl", base, xs, params, seed=0)
    assert torch.equal(got, composite.ram(base, xs, 1e-2, r=0.5, alpha=0.4))
    got = methods.merge_tensor("ram", base, xs, {"epsilon": 1e-2}, seed=0)
    assert torch.equal(got, composite.ram(base, xs, 1e-2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_is_written_in_place(backend, dtype):
    """out= gives the plain call's values in the caller's tensor, which may be one of the inputs."""
    base, *xs = [randn((33, 129), dtype, seed=20 + i) for i in range(3)]
    expected = fk.ram_merge(base, xs, 0.2, [1.5, 0.5])
    out = torch.full_like(base, float("nan"))
    assert fk.ram_merge(base, xs, 0.2, [1.5, 0.5], out=out) is out and torch.equal(out, expected)
    inputs = [t.clone() for t in (base, *xs)]
    assert torch.equal(fk.ram_merge(inputs[0], inputs[1:], 0.2, [1.5, 0.5], out=inputs[2]), expected)


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.ram_merge(a, [a[:2]], 0.1), fk.ShapeError, "'xs[0]'"),
        (lambda a: fk.ram_merge(a, [a.half()], 0.1), fk.DTypeError, "'xs[0]'"),
        (lambda a: fk.ram_merge(a.int(), [a.int()], 0.1), fk.DTypeError, "'base'"),
        (lambda a: fk.ram_merge(a, [a], -1.0), fk.WeightError, "'epsilon'"),
        (lambda a: fk.ram_merge(a, [a], float("nan")), fk.WeightError, "'epsilon'"),
        (lambda a: fk.ram_merge(a, [a, a], 0.1, [1.0]), fk.WeightError, "'scales'"),
        (lambda a: fk.ram_merge(a, [], 0.1), fk.ShapeError, "'xs'"),
        (lambda a: fk.ram_counts(a, [a[:1]], 0.1), fk.ShapeError, "'xs[0]'"),
        (lambda a: fk.ram_counts(a, [a], None), fk.WeightError, "'epsilon'"),
        (lambda a: fk.ram_merge(a, [a.clone()], 0.1, out=a.double()), fk.DTypeError, "'out'"),
        (lambda a: fk.ram_merge(a[1:], [a[:-1].clone()], 0.1, out=a[:-1]), fk.AliasError, "'out'"),
    ],
    ids=[
        "shape",
        "dtype",
        "int",
        "negative-eps",
        "nan-eps",
        "scales-count",
        "empty",
        "counts-shape",
        "counts-eps",
        "out-dtype",
        "out-overlap",
    ],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


def test_opcheck():
    base, xs = torch.randn(5, 6), [torch.randn(5, 6), torch.randn(5, 6)]
    torch.library.opcheck(torch.ops.fusion_kernels.ram_merge.default, (base, xs, [1.0, 2.0], 0.5))
    args = (base, xs, [1.0, 2.0], 0.5, torch.empty(5, 6))
    torch.library.opcheck(torch.ops.fusion_kernels.ram_merge_out.default, args)
