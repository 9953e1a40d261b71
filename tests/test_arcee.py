"""arcee_importance and arcee_select (mergekit's arcee_fusion): the reference against the formula in
float64, every backend within the reference's own error (dtypes; odd, empty and strided shapes),
the KL of two close vectors far more accurate than float32's reference, non-finite rows, the
selection's bits, the multi-k threshold, the method on top of them, bad input."""

import pytest
import torch
from helpers import DTYPES, assert_refused, assert_within_reference_error, randn

import fusion_kernels as fk
from fusion_kernels import methods
from fusion_kernels.reference import composite

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _pair(shape, dtype, seed=0, spread=0.3):
    base = randn(shape, torch.float64, seed)
    return base.to(dtype), (base + spread * randn(shape, torch.float64, seed + 1)).to(dtype)


def _by_formula(base, x):
    """The importance one vector at a time in Python float64 (the formula as mergekit writes it)."""
    import math

    rows_b, rows_x = base.double().reshape(-1, base.shape[-1]).tolist(), x.double().reshape(-1, x.shape[-1]).tolist()
    out = []
    for b, v in zip(rows_b, rows_x, strict=True):
        eb, ev = [math.exp(t - max(b)) for t in b], [math.exp(t - max(v)) for t in v]
        q, p = [t / sum(eb) + 1e-8 for t in eb], [t / sum(ev) + 1e-8 for t in ev]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        out.append([abs(vi - bi) * kl for vi, bi in zip(v, b, strict=True)])
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_reference_matches_the_formula():
    base, x = _pair((5, 13), torch.float64)
    torch.testing.assert_close(composite.arcee_importance(base, x), _by_formula(base, x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (3, 5, 7), (0, 8), (1,), (6, 1)])
def test_backend_within_the_references_error(backend, dtype, shape):
    base, x = _pair(shape, dtype, seed=1)
    got = fk.arcee_importance(base, x)
    assert got.shape == base.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:  # the reference is the exact answer; the KL sums in another order
        torch.testing.assert_close(got.cpu(), composite.arcee_importance(base, x).cpu(), rtol=1e-12, atol=1e-15)
    else:
        assert_within_reference_error(got, composite.arcee_importance, base, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_close_vectors_keep_their_kl(backend, dtype):
    """Tuned weights a hair from the base: KL ≈ 2·10⁻⁶, below float32's rounding of the softmax
    normalisers. The reference's float32 KL is off by several per cent there; the kernels' by far less."""
    if backend == "torch":
        pytest.skip("the torch backend runs the reference")
    base = (0.02 * randn((48, 2048), torch.float64, seed=2)).to(dtype)
    x = (base.double() + 0.002 * randn((48, 2048), torch.float64, seed=3)).to(dtype)
    exact = composite.arcee_importance(base.double(), x.double())
    moved = exact > 0
    rel = lambda t: ((t.cpu().double() - exact) / exact)[moved].abs().max().item()  # noqa: E731
    ours, reference = rel(fk.arcee_importance(base, x)), rel(composite.arcee_importance(base, x))
    assert reference > 0.01  # the difficulty is real
    assert ours < 0.005 and ours < reference / 5, (ours, reference)


def _rel_error(got, exact):
    moved = exact > 0
    return ((got.cpu().double() - exact) / exact)[moved].abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DT_IDS[:3])
@pytest.mark.parametrize("spread", [1e-4, 1e-3, 5e-3])
def test_fine_tune_rows_keep_their_kl_to_float32_precision(backend, dtype, spread):
    """Rows a fine-tune leaves nearly flat take the kernels' fast path (one exponential, no logarithm,
    KL as Σ p·(l + e⁻ˡ − 1)): at a KL of 10⁻⁸ (spread 10⁻⁴, where the reference's float32 KL is
    noise) the importance is within a few float32 roundings of the float64 formula. A sum Σ p·l
    would carry the normalisers' rounding at first order (tens of per cent there)."""
    if backend == "torch":
        pytest.skip("the torch backend runs the reference")
    base = 0.02 * randn((16, 4096), torch.float64, seed=12)
    x = base + spread * randn((16, 4096), torch.float64, seed=13)
    base, x = base.to(dtype), x.to(dtype)
    exact = composite.arcee_importance(base.double(), x.double())
    assert _rel_error(fk.arcee_importance(base, x), exact) < 2e-6


def test_rows_off_the_fast_path_keep_the_general_formula(backend):
    """One tensor, rows of every kind: a fine-tune's (fast path), one with a logit so low that its
    softmax entry is below 128·eps (log1p's series would not hold), one whose task vector has an
    element 0.1 off the rest (e^(x - max x) not near e^(base - max base)), one of both, and the
    spread-0.3 rows of _pair: each within the general formula's error of the float64 one."""
    if backend == "torch":
        pytest.skip("the torch backend runs the reference")
    base = 0.02 * randn((5, 2048), torch.float64, seed=14)
    x = base + 0.002 * randn((5, 2048), torch.float64, seed=15)
    base[1, 7] = x[1, 7] = -25.0
    x[2, 100] += 0.1
    base[3, 9] = x[3, 9] = -25.0
    x[3, 500] -= 0.1
    base[4], x[4] = _pair((2048,), torch.float64, seed=16)
    base, x = base.float(), x.float()
    exact = composite.arcee_importance(base.double(), x.double())
    got = fk.arcee_importance(base, x)
    for row in range(5):
        assert _rel_error(got[row], exact[row]) < (2e-6 if row == 0 else 5e-3), row


def test_rows_holding_inf_or_nan_get_the_references_values(backend):
    base, x = _pair((6, 40), torch.float32, seed=4)
    x[1, 3], base[3, 0], x[4, 7] = float("inf"), float("nan"), float("-inf")
    got, expected = fk.arcee_importance(base, x).cpu(), composite.arcee_importance(base.cpu(), x.cpu())
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_threads(backend):
    base, x = _pair((97, 300), torch.bfloat16, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fk.arcee_importance(base, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fk.arcee_importance(base, x), one)


def test_strided_inputs_and_caller_tensors_untouched(backend):
    base, x = _pair((8, 40), torch.float16, seed=6)
    before = (base.clone(), x.clone())
    got = fk.arcee_importance(base[:, ::2], x[:, ::2])
    assert torch.equal(got, fk.arcee_importance(base[:, ::2].contiguous(), x[:, ::2].contiguous()))
    assert torch.equal(base, before[0]) and torch.equal(x, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4099,), (33, 129), (0, 8)])
def test_select_copies_the_chosen_bits(backend, dtype, shape):
    base, x = _pair(shape, dtype, seed=7)
    if base.numel():
        x.view(-1)[0] = float("nan")  # copied as it is
    importance = fk.arcee_importance(base, x)
    cut = float(importance.nan_to_num().median()) if importance.numel() else 0.0
    got = fk.arcee_select(base, x, importance, cut)
    assert got.dtype == dtype
    wide = importance.dtype
    expected = torch.where(importance >= torch.tensor(cut, dtype=wide), x, base)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.cpu().view(bits), expected.cpu().view(bits))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_forms_write_the_same_values_into_the_callers_tensors(backend, dtype):
    """arcee_importance(out=) and arcee_select(out=) equal their plain calls, in the given tensors
    (the select's out may be base itself); the method with a scratch buffer equals it without."""
    base, x = _pair((33, 129), dtype, seed=3)
    importance = fk.arcee_importance(base, x)
    into = torch.full_like(importance, float("nan"))
    assert fk.arcee_importance(base, x, out=into) is into
    assert torch.equal(into, importance)
    cut = float(importance.median())
    expected = fk.arcee_select(base, x, importance, cut)
    out = torch.full_like(base, float("nan"))
    assert fk.arcee_select(base, x, importance, cut, out=out) is out
    assert torch.equal(out, expected)
    in_place = base.clone()
    assert torch.equal(fk.arcee_select(in_place, x, importance, cut, out=in_place), expected)
    if dtype.itemsize != 2:
        return
    big_base, big_x = _pair((8, 1024), dtype, seed=4)  # 16-bit: the fused importance, into the scratch
    plain = methods.merge_tensor("arcee_fusion", big_base, [big_x], {}, seed=0)
    nbytes = methods.scratch_buffer_bytes("arcee_fusion", big_base.numel(), dtype)
    scratch = torch.full((nbytes,), 255, dtype=torch.uint8, device=big_base.device)
    assert torch.equal(methods.merge_tensor("arcee_fusion", big_base, [big_x], {}, seed=0, scratch=scratch), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitude_thresholds_equal_one_at_a_time(backend, dtype):
    x = randn((5000,), dtype, seed=8)
    ks = [4000, 1, 2500, 5000, 2500]
    got = fk.magnitude_thresholds(x, ks)
    assert got.dtype == dtype and got.shape == (len(ks),)
    assert torch.equal(got.cpu(), torch.stack([fk.magnitude_threshold(x, k=k) for k in ks]).cpu())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitude_thresholds_of_a_sample_drawn_in_parts(threads, dtype):
    """Above 2¹³ elements the sample that brackets each k is drawn and sorted in one part per thread
    and merged: the thresholds are the k-th largest |x| whatever the thread count (bf16: many ties)."""
    x = randn((300_001,), dtype, seed=11)
    ks = [1, 75_001, 150_000, 225_000, 300_001]
    want = x.float().abs().sort(descending=True).values[torch.tensor(ks) - 1].to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fk.magnitude_thresholds(x, ks)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.abs(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_method_is_no_farther_from_float64_than_the_reference(dtype):
    """arcee_fusion on 16-bit tensors (and above 10⁶ elements) runs on the fused importance: its
    selection misses the float64 formula's in fewer elements than the float32 reference's."""
    base = (0.02 * randn((64, 1024), torch.float64, seed=9)).to(dtype)
    x = (base.double() + 0.002 * randn((64, 1024), torch.float64, seed=10)).to(dtype)
    exact = composite.arcee_fusion(base.double(), x.double()).to(dtype)
    ours = methods.merge_tensor("arcee_fusion", base, [x], {}, seed=0)
    misses = lambda t: int((t != exact).sum())  # noqa: E731
    assert misses(ours) <= misses(composite.arcee_fusion(base, x))
    if dtype == torch.float32:  # up to 10⁶ elements: the reference's steps, mergekit's bits
        assert torch.equal(ours, composite.arcee_fusion(base, x))


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.arcee_importance(a, a[:2]), fk.ShapeError, "'x'"),
        (lambda a: fk.arcee_importance(a, a.half()), fk.DTypeError, "'x'"),
        (lambda a: fk.arcee_importance(a.int(), a.int()), fk.DTypeError, "'base'"),
        (lambda a: fk.arcee_importance(a, None), fk.ArgumentTypeError, "'x'"),
        (lambda a: fk.arcee_select(a, a, a.double(), 0.5), fk.DTypeError, "'importance'"),
        (lambda a: fk.arcee_select(a, a, a[:1], 0.5), fk.ShapeError, "'importance'"),
        (lambda a: fk.arcee_select(a, a, a, "0.5"), fk.WeightError, "'cut'"),
        (lambda a: fk.arcee_select(a, a.half(), a, 0.5), fk.DTypeError, "'x'"),
        (lambda a: fk.arcee_importance(a, a, out=a.double()), fk.DTypeError, "'out'"),
        (lambda a: fk.arcee_importance(a, a, out=a[:2].clone()), fk.ShapeError, "'out'"),
        (lambda a: fk.arcee_importance(a, a.clone(), out=a), fk.AliasError, "'out'"),
        (lambda a: fk.arcee_select(a, a, a.clone(), 0.5, out=a.half()), fk.DTypeError, "'out'"),
        (lambda a: fk.magnitude_thresholds(a, [0]), fk.WeightError, "'ks'"),
        (lambda a: fk.magnitude_thresholds(a, [13]), fk.WeightError, "'ks'"),
    ],
    ids=[
        "shape",
        "dtype",
        "int",
        "none",
        "importance-dtype",
        "importance-shape",
        "cut",
        "select-dtype",
        "out-dtype",
        "out-shape",
        "out-alias",
        "select-out-dtype",
        "k0",
        "kbig",
    ],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


def test_opcheck():
    base, x = torch.randn(5, 6), torch.randn(5, 6)
    torch.library.opcheck(torch.ops.fusion_kernels.arcee_importance.default, (base, x))
    torch.library.opcheck(torch.ops.fusion_kernels.arcee_select.default, (base, x, torch.rand(5, 6), 0.5))
    out = torch.empty(5, 6)
    torch.library.opcheck(torch.ops.fusion_kernels.arcee_importance_out.default, (base, x, out))
    torch.library.opcheck(torch.ops.fusion_kernels.arcee_select_out.default, (base, x, torch.rand(5, 6), 0.5, out))
