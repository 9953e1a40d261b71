"""sce_variance and sce_energies: the reference against the formula per element, every backend
against the reference (variances bit for bit, energies to float32 rounding; dtypes, odd, empty and
strided shapes, 1 to 5 models, zero and non-finite task vectors), out=, bad input; and the sce
method's top-k mask and pooled buffers."""

import pytest
import torch
from helpers import DTYPES, assert_peer_close, assert_refused, device, randn

import fusion_kernels as fk
from fusion_kernels import methods
from fusion_kernels import reference as ref
from fusion_kernels.errors import AliasError, ArgumentTypeError, DTypeError, ShapeError
from fusion_kernels.ops import sce as sce_ops
from fusion_kernels.reference import composite

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _family(n, shape, dtype, seed=0):
    """A base and n tunes; some elements where a tune equals the base or another tune (zero
    variance, zero task vectors)."""
    base = randn(shape, torch.float64, seed)
    xs = [base + 0.1 * randn(shape, torch.float64, seed + 1 + i) for i in range(n)]
    flat = [x.view(-1) for x in xs]
    if base.numel() >= 4:
        flat[0][:3] = base.view(-1)[:3]
        for f in flat[1:]:
            f[:2] = flat[0][:2]
    return base.to(dtype), [x.to(dtype) for x in xs]


def test_reference_matches_the_formula():
    base, xs = _family(3, (5, 7), torch.float32)
    var = composite.sce_variance(base, xs)
    for j in range(base.numel()):
        taus = [float(x.view(-1)[j]) - float(base.view(-1)[j]) for x in xs]
        mean = sum(taus) / 3
        assert var.view(-1)[j].item() == pytest.approx(sum((t - mean) ** 2 for t in taus) / 3, rel=1e-5, abs=1e-12)
    mask = var > var.median()
    energies = composite.sce_energies(base, xs, mask)
    for e, x in zip(energies, xs, strict=True):
        assert e == pytest.approx(float(((x.double() - base.double()) * mask).square().sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,)])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_backend_matches_reference(backend, dtype, shape, n):
    """The variances in the reference's float32 operations and order: bit for bit (they decide
    which elements SCE keeps); the nonzero count exact; the energies to float32 rounding."""
    base, xs = _family(n, shape, dtype, seed=n)
    var, nonzero = fk.sce_variance(base, xs)
    expected = composite.sce_variance(base.cpu(), [x.cpu() for x in xs])
    assert var.dtype == expected.dtype and var.shape == base.shape
    assert torch.equal(var.cpu(), expected)
    assert nonzero == int(torch.count_nonzero(expected))
    if base.numel() >= 4 and n > 1:
        assert 0 < nonzero < base.numel()  # the planted zero variances are counted out
    mask = var > var.median() if var.numel() else torch.zeros(base.shape, dtype=torch.bool, device=device())
    for m in (None, mask):
        got = fk.sce_energies(base, xs, m)
        want = composite.sce_energies(base.cpu(), [x.cpu() for x in xs], None if m is None else m.cpu())
        assert got == pytest.approx(want, rel=2e-6, abs=0)


def test_strided_inputs_give_the_contiguous_results(backend):
    base, xs = _family(3, (40, 24), torch.bfloat16, seed=4)
    strided = [t.t().contiguous().t() for t in (base, *xs)]
    assert not strided[0].is_contiguous()
    var, nonzero = fk.sce_variance(strided[0], strided[1:])
    want, want_nonzero = fk.sce_variance(base, xs)
    assert torch.equal(var, want) and nonzero == want_nonzero
    assert fk.sce_energies(strided[0], strided[1:]) == fk.sce_energies(base, xs)


def test_non_finite_task_vectors_count_as_nonzero(backend):
    base = torch.zeros(9, device=device())
    x = torch.zeros(9, device=device())
    x[0], x[1], x[2] = float("inf"), float("nan"), 1.0
    var, nonzero = fk.sce_variance(base, [x, base.clone()])
    expected = composite.sce_variance(base.cpu(), [x.cpu(), base.cpu()])
    assert torch.equal(var.cpu().isnan(), expected.isnan()) and nonzero == int(torch.count_nonzero(expected)) == 3


def test_out_is_written_in_place(backend):
    base, xs = _family(2, (13, 11), torch.float16, seed=2)
    out = torch.full((13, 11), float("nan"), device=device())
    var, nonzero = fk.sce_variance(base, xs, out=out)
    assert var is out
    assert torch.equal(out, fk.sce_variance(base, xs)[0]) and nonzero == fk.sce_variance(base, xs)[1]


def test_bad_out_is_refused():
    base, xs = _family(2, (6, 4), torch.bfloat16)
    with pytest.raises(DTypeError, match="'out'"):
        fk.sce_variance(base, xs, out=torch.empty(6, 4, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="'out'"):
        fk.sce_variance(base, xs, out=torch.empty(4, 6))
    with pytest.raises(ShapeError, match="contiguous"):
        fk.sce_variance(base, xs, out=torch.empty(4, 6).t())
    wide = torch.zeros(6, 4)
    with pytest.raises(AliasError, match="'out'"):
        fk.sce_variance(wide, [wide.clone()], out=wide)


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.sce_variance("base", [a]), ArgumentTypeError, "'base'"),
        (lambda a: fk.sce_variance(a.int(), [a.int()]), DTypeError, "'base'"),
        (lambda a: fk.sce_variance(a, [a[:2]]), ShapeError, "'xs[0]'"),
        (lambda a: fk.sce_variance(a, [a.half()]), DTypeError, "'xs[0]'"),
        (lambda a: fk.sce_energies(a, [a], a > 0.5), None, None),
        (lambda a: fk.sce_energies(a, [a], (a > 0).float()), DTypeError, "'mask'"),
        (lambda a: fk.sce_energies(a, [a], a[:1] > 0), ShapeError, "'mask'"),
        (lambda a: fk.sce_energies(a, [a], "mask"), ArgumentTypeError, "'mask'"),
    ],
    ids=["base-type", "base-dtype", "x-shape", "x-dtype", "good-mask", "mask-dtype", "mask-shape", "mask-type"],
)
def test_bad_input(call, error, argument):
    if error is None:
        call(torch.randn(3, 4, device=device()))
        return
    assert_refused(call, error, argument)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (0, 8), (1,)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0])
def test_select_keeps_the_top_k(backend, dtype, shape, density):
    """The mask equals the reference's top-k mask (ties at the threshold by lowest index: the
    variances of two bf16/fp16 task vectors are discrete, many equal), its count is k, the energies
    over it to float32 rounding."""
    base, xs = _family(2, shape, dtype, seed=5)
    var, nonzero = fk.sce_variance(base, xs)
    k = int(nonzero * density)
    threshold = float(fk.magnitude_threshold(var, k=k)) if k else 0.0
    out = torch.ones(shape, dtype=torch.bool, device=device())
    mask, kept, energies = fk.sce_select(base, xs, var, threshold, k, out=out)
    expected = ref.top_k_mask(var.cpu(), k)
    assert mask is out and torch.equal(mask.cpu(), expected) and kept == k
    want = composite.sce_energies(base.cpu(), [x.cpu() for x in xs], expected)
    assert energies == pytest.approx(want, rel=2e-6, abs=0)


def test_select_shares_the_ties_between_threads_in_index_order(backend):
    """Every variance equal: the first k elements are kept, however the threads split them."""
    n = 1 << 16
    base, xs = torch.zeros(n, device=device()), [torch.ones(n, device=device()), -torch.ones(n, device=device())]
    var, _ = fk.sce_variance(base, xs)
    for k in (1, 777, n // 2 + 3, n):
        mask, kept, energies = fk.sce_select(base, xs, var, 1.0, k)
        assert kept == k and bool(mask[:k].all()) and not bool(mask[k:].any())
        assert energies == [float(k), float(k)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("density", [0.01, 0.3, 0.7, 0.99])
def test_select_with_the_cut_of_the_threshold_search_equals_it_without(backend, dtype, density):
    """The top-k search's tie cut (the cpu backend's) spares sce_select its tally pass: the same mask,
    count and energies as sce_select placing the ties itself, equal to the reference top-k mask; a
    cut given by hand on every backend (the torch one too) keeps the ties below it."""
    base, xs = _family(2, (3, 70001), dtype, seed=11)  # bf16/fp16: discrete variances, many ties
    var, nonzero = fk.sce_variance(base, xs)
    k = int(nonzero * density)
    threshold, cut = sce_ops.top_k_threshold(var, k)
    assert threshold == float(fk.magnitude_threshold(var, k=k))
    expected = ref.top_k_mask(var.cpu(), k)
    if cut is not None:  # past the last variance equal to the threshold that the top k holds
        assert cut == int((expected.view(-1) & (var.view(-1).cpu() == threshold)).nonzero().max()) + 1
    mask, kept, energies = fk.sce_select(base, xs, var, threshold, k, cut=cut)
    plain = fk.sce_select(base, xs, var, threshold, k)
    assert torch.equal(mask.cpu(), expected) and kept == k
    assert torch.equal(plain[0], mask) and plain[1] == kept and plain[2] == pytest.approx(energies, rel=1e-12)
    tied = (var.view(-1) == threshold).nonzero().view(-1).cpu()
    by_hand = int(tied[len(tied) // 2]) + 1  # the first half of the ties: fewer than k kept
    mask, kept, _ = fk.sce_select(base, xs, var, threshold, k, cut=by_hand)
    want = (~(var.view(-1) <= threshold)) | ((var.view(-1) == threshold) & (torch.arange(var.numel()) < by_hand))
    assert torch.equal(mask.view(-1).cpu(), want.cpu()) and kept == int(want.sum())


def test_bad_select_input_is_refused():
    base, xs = _family(2, (6, 4), torch.bfloat16)
    var, _ = fk.sce_variance(base, xs)
    with pytest.raises(DTypeError, match="'var'"):
        fk.sce_select(base, xs, var.bfloat16(), 0.1, 3)
    with pytest.raises(ShapeError, match="'var'"):
        fk.sce_select(base, xs, var[:3], 0.1, 3)
    with pytest.raises(fk.WeightError, match="'threshold'"):
        fk.sce_select(base, xs, var, float("inf"), 3)
    with pytest.raises(fk.WeightError, match="'k'"):
        fk.sce_select(base, xs, var, 0.1, 25)
    for cut in (-1, 25, 2.0, True):
        with pytest.raises(fk.WeightError, match="'cut'"):
            fk.sce_select(base, xs, var, 0.1, 3, cut=cut)
    with pytest.raises(DTypeError, match="'out'"):
        fk.sce_select(base, xs, var, 0.1, 3, out=torch.empty(6, 4))


@pytest.mark.parametrize(
    "values, k, kept",
    [
        ([3.0, 1.0, 2.0, 2.0, 2.0, 0.0], 3, [0, 2, 3]),  # a tie at the threshold: the lowest indices
        ([1.0, float("nan"), 5.0, 0.0], 2, [1, 2]),  # NaN ranks above every number
        ([1.0, float("inf"), 5.0, 0.0], 1, [1]),  # an infinite threshold
        ([0.5, 4.0, 0.25, 3.0], 2, [1, 3]),  # no tie: values >= the k-th largest, one pass
        ([0.5, 4.0, 0.25, 3.0], 0, []),
    ],
)
def test_sce_top_k_keeps_the_lowest_index_at_a_tie_and_nan_first(values, k, kept):
    """The method's mask: exactly k elements, by sce_select (with the energies over it), or by
    magnitude_prune where the k-th largest is not finite (then without energies)."""
    var = torch.tensor(values)
    base = torch.zeros(len(values))
    x = torch.arange(1.0, len(values) + 1)
    out = torch.ones(len(values), dtype=torch.bool)
    mask, energies = methods._sce_top_k(base, [x], var, k, out)
    assert mask is out and mask.nonzero().view(-1).tolist() == kept
    if energies is not None:
        assert energies == [float(sum((i + 1.0) ** 2 for i in kept))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("topk", [0.5, 1.0])
def test_the_method_in_pooled_buffers_equals_it_without(dtype, topk):
    """merge_tensor('sce', out=, scratch=): a scratch filled with 0xff and an out of NaN give the
    values of the call without them, equal to the reference."""
    base, xs = _family(3, (37, 23), dtype, seed=9)
    params = {"select_topk": topk, "int8_mask": False}
    plain = methods.merge_tensor("sce", base, xs, params, seed=0)
    scratch = torch.full((methods.scratch_buffer_bytes("sce", base.numel(), dtype),), 0xFF, dtype=torch.uint8)
    out = torch.full_like(base, float("nan"))
    pooled = methods.merge_tensor("sce", base, xs, params, seed=0, out=out, scratch=scratch)
    assert pooled is out and torch.equal(pooled, plain)
    expected = composite.sce(base, xs, topk)
    assert_peer_close(plain, expected, "float32_formula")
