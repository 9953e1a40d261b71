"""truncated_svd and polar: the reference against numpy's float64 SVD, every backend against the
reference (dtypes, square, tall, wide, batched, odd, empty and strided shapes, every route of the
cpu backend: float32 Gram, float64 Gram, SVD), the subspace merges on them, bad input."""

import threading

import numpy as np
import pytest
import torch
from helpers import DTYPES, device, to_numpy64

import fusion_kernels as fk
from fusion_kernels import reference as ref
from fusion_kernels.errors import ArgumentTypeError, DTypeError, ShapeError, WeightError

DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
# singular vectors of matrices whose singular values are 0.05 apart, rounded to the dtype
TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 4e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}


def spectrum_matrix(shape, singular_values, seed=0) -> torch.Tensor:
    """Q₁·diag(σ)·Q₂ᵀ with random orthonormal Q₁, Q₂, for every matrix of a batch (float64)."""
    g = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    r = min(m, n)
    q1 = torch.linalg.qr(torch.randn(*lead, m, r, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(*lead, n, r, generator=g, dtype=torch.float64))[0]
    return (q1 * torch.as_tensor(singular_values, dtype=torch.float64)) @ q2.mT


def separated(shape, dtype, seed=0) -> torch.Tensor:
    """A batch with singular values 1 > ... > 0.3, evenly spaced: each singular vector well defined."""
    r = min(shape[-2:])
    return spectrum_matrix(shape, torch.linspace(1.0, 0.3, r), seed).to(dtype).to(device())


def assert_triplets_close(got, want, dtype):
    (u, s, vh), (ru, rs, rvh) = got, want
    assert u.shape == ru.shape and s.shape == rs.shape and vh.shape == rvh.shape
    assert u.dtype == s.dtype == vh.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(s.cpu().double(), rs.cpu().double(), **tol)
    flip = torch.sign((u.double() * ru.double()).sum(-2, keepdim=True))
    torch.testing.assert_close((u.double() * flip).cpu(), ru.cpu().double(), **tol)
    torch.testing.assert_close((vh.double() * flip.mT).cpu(), rvh.cpu().double(), **tol)


@pytest.fixture
def newton_from_32(monkeypatch):
    """Newton's iteration for square matrices from 32² (384² in use): its route on small, cheap shapes."""
    from fusion_kernels.ops import low_rank

    monkeypatch.setattr(low_rank, "_NEWTON_MIN", 32)


SHAPES = [(12, 12), (40, 12), (12, 40), (2, 3, 17, 9), (1, 1), (7, 3)]


def test_reference_matches_numpy_float64():
    x = separated((3, 20, 11), torch.float64)
    u, s, vh = np.linalg.svd(to_numpy64(x), full_matrices=False)
    for k in (0, 4, 11):
        got = ref.truncated_svd(x, k)
        want = tuple(torch.from_numpy(a) for a in (u[..., :k], s[..., :k], vh[..., :k, :]))
        assert_triplets_close(got, want, torch.float64)
    q, sq = ref.polar(x)
    torch.testing.assert_close(q, torch.from_numpy(u @ vh), **TOL[torch.float64])
    torch.testing.assert_close(sq, torch.from_numpy(s), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_truncated_svd_matches_reference(backend, dtype, shape):
    x = separated(shape, dtype, seed=len(shape))
    before = x.clone()
    r = min(shape[-2:])
    for k in sorted({0, 1, r // 2, r}):
        u, s, vh = fk.truncated_svd(x, k)
        assert_triplets_close((u, s, vh), ref.truncated_svd(x, k), dtype)
        assert u.is_contiguous() and s.is_contiguous() and vh.is_contiguous()
        eye = torch.eye(k, dtype=torch.float64)
        torch.testing.assert_close((u.double().mT @ u.double()).cpu(), eye.expand_as(u.mT @ u), **TOL[dtype])
        torch.testing.assert_close((vh.double() @ vh.double().mT).cpu(), eye.expand_as(u.mT @ u), **TOL[dtype])
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [*SHAPES, (60, 12), (12, 60), (3, 36, 12), (2, 40, 40)], ids=str)
def test_polar_matches_reference(backend, dtype, shape, newton_from_32):
    """Square-ish matrices go by SVD (without S, by Newton's iteration from 384², here from 32²),
    those twice as long as wide or more by a Gram."""
    x = separated(shape, dtype, seed=len(shape) + 1)
    before = x.clone()
    q, s = fk.polar(x)
    rq, rs = ref.polar(x)
    assert q.shape == x.shape and s.shape == (*shape[:-2], min(shape[-2:])) and q.dtype == s.dtype == dtype
    assert q.is_contiguous() and s.is_contiguous()
    torch.testing.assert_close(q.cpu().double(), rq.cpu().double(), **TOL[dtype])
    torch.testing.assert_close(s.cpu().double(), rs.cpu().double(), **TOL[dtype])
    q_only, no_values = fk.polar(x, values=False)
    assert no_values is None and q_only.dtype == dtype and q_only.is_contiguous()
    torch.testing.assert_close(q_only.cpu().double(), rq.cpu().double(), **TOL[dtype])
    h = q.double().mT @ x.double()  # x = Q·H, H symmetric positive definite here
    torch.testing.assert_close(h, h.mT, **TOL[dtype]) if shape[-2] >= shape[-1] else None
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape, k", [((0, 4), 0), ((3, 0), 0), ((0, 5, 5), 2), ((2, 0, 3, 3), 3)], ids=str)
def test_empty_shapes(backend, shape, k):
    x = torch.empty(shape, device=device())
    got, want = fk.truncated_svd(x, k), ref.truncated_svd(x, k)
    assert [t.shape for t in got] == [t.shape for t in want]
    q, s = fk.polar(x)
    assert q.shape == x.shape and s.shape == ref.polar(x)[1].shape


def test_strided_inputs_give_the_contiguous_results(backend):
    """A strided view is copied: the contiguous results exactly. A transposed contiguous batch is
    taken as it is (LAPACK handed its transpose): the same within rounding."""
    big = separated((2, 30, 50), torch.float32, seed=3)
    for x, tol in ((big.mT, 1e-6), (big[:, ::2, 1::3], 0.0), (big[:, :, :25], 0.0)):
        assert not x.is_contiguous()
        for got, want in zip(fk.truncated_svd(x, 5), fk.truncated_svd(x.contiguous(), 5), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
        for got, want in zip(fk.polar(x), fk.polar(x.contiguous()), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "shape", [(12, 12), (60, 12), (12, 60), (2, 3, 36, 12), (3, 12, 40), (7, 3), (40, 40)], ids=str
)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_polar_times_right_equals_q_times_right(backend, dtype, shape, transposed, newton_from_32):
    """polar(x, right) is Q·right (every route: the Gram's takes right into its product), for
    contiguous x and x stored transposed, without touching either input."""
    x = separated(shape, dtype, seed=5)
    if transposed:
        x = x.mT.contiguous().mT
    right = separated((*shape[:-2], shape[-1], 5), dtype, seed=6)
    before = (x.clone(), right.clone())
    q, s = fk.polar(x, right=right)
    rq, rs = ref.polar(x)
    assert q.shape == (*shape[:-1], 5) and q.dtype == dtype and q.is_contiguous()
    want = rq.double() @ right.double()
    torch.testing.assert_close(q.cpu().double(), want.cpu(), **TOL[dtype])
    torch.testing.assert_close(fk.polar(x, right=right, values=False)[0].cpu().double(), want.cpu(), **TOL[dtype])
    torch.testing.assert_close(s.cpu().double(), rs.cpu().double(), **TOL[dtype])
    assert torch.equal(x, before[0]) and torch.equal(right, before[1])


def test_polar_right_under_autograd_and_empty():
    x = separated((20, 6), torch.float64, seed=7).requires_grad_()
    right = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    q, _ = fk.polar(x, right=right)
    q.sum().backward()
    y, r2 = x.detach().clone().requires_grad_(), right.detach().clone().requires_grad_()
    (ref.polar(y)[0] @ r2).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(right.grad, r2.grad)
    assert fk.polar(torch.zeros(0, 5, 4), right=torch.zeros(0, 4, 3))[0].shape == (0, 5, 3)
    assert fk.polar(torch.randn(2, 5, 4), right=torch.zeros(2, 4, 0))[0].shape == (2, 5, 0)


def test_every_route_of_the_cpu_backend_in_one_batch():
    """One batch with a matrix for each route: float32 Gram (λ₅ ≥ 10⁻²·λ₁), float64 Gram (λ₅ =
    10⁻⁴·λ₁: the float32 Gram's rounding would reach its 5th vector), SVD (rank 3 < k = 5, and a
    zero matrix). Each equals the reference's truncation: same U·S·Vh, orthonormal U."""
    r, k = 16, 5
    spectra = [
        torch.linspace(1.0, 0.3, r),
        torch.cat([torch.tensor([1.0, 0.5, 0.1, 0.05, 0.01]), torch.full((r - 5,), 1e-3)]),
        torch.cat([torch.tensor([1.0, 0.7, 0.4]), torch.zeros(r - 3)]),
        torch.zeros(r),
    ]
    x = torch.stack([spectrum_matrix((48, r), sv, seed=i) for i, sv in enumerate(spectra)]).float()
    with fk.use_backend("cpu"):
        u, s, vh = fk.truncated_svd(x, k)
    ru, rs, rvh = ref.truncated_svd(x, k)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, (ru * rs.unsqueeze(-2)) @ rvh, rtol=1e-5, atol=1e-6)
    for i in range(3):  # the zero matrix's vectors are arbitrary
        kept = int((rs[i] > 0).sum())
        torch.testing.assert_close(u[i, :, :kept].mT @ u[i, :, :kept], torch.eye(kept), rtol=0, atol=1e-5)


def test_every_route_of_polar_in_one_batch(monkeypatch):
    """Tall float32 matrices of κ = 2 (float32 Gram), κ = 100 (float64 Gram) and κ = 10⁵ (SVD),
    each route taken for its matrix only: Q as close to the float64 polar factor as a float32
    SVD's (within 2× and 10⁻⁷; the SVD route within the ε·κ both have), S to float32 rounding."""
    from fusion_kernels.ops import low_rank

    spectra = [torch.linspace(1.0, 0.5, 12), torch.logspace(0, -2, 12), torch.logspace(0, -5, 12)]
    x = torch.stack([spectrum_matrix((40, 12), sv, seed=i) for i, sv in enumerate(spectra)]).float()
    grams, real_gram_eigh = [], low_rank._gram_eigh
    monkeypatch.setattr(
        low_rank, "_gram_eigh", lambda a, *args: grams.append((a.dtype, len(a))) or real_gram_eigh(a, *args)
    )
    with fk.use_backend("cpu"):
        q, s = fk.polar(x)
    assert grams == [(torch.float32, 3), (torch.float64, 2)]  # then the SVD for the last one
    exact_q, exact_s = ref.polar(x.double())
    svd_error = (ref.polar(x)[0].double() - exact_q).abs().amax((-2, -1))
    error = (q.double() - exact_q).abs().amax((-2, -1))
    assert (error[:2] <= 2 * svd_error[:2] + 1e-7).all(), (error, svd_error)
    assert error[2] <= 10 * svd_error[2]  # both float32 SVDs (LAPACK's gesdd, torch's), at ε·κ
    torch.testing.assert_close(s.double(), exact_s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e30, 1e-25, 1e-40], ids=str)
def test_huge_and_tiny_entries(scale):
    """Float32 matrices whose Gram would overflow (entries 10³⁰) or underflow (10⁻²⁵; subnormal 10⁻⁴⁰):
    the cpu backend turns them down for the float32 Gram (its largest diagonal entry out of range)
    and takes them from the float64 Gram, equal to the reference."""
    x = (separated((2, 40, 12), torch.float64, seed=6) * scale).float()
    with fk.use_backend("cpu"):
        u, s, vh = fk.truncated_svd(x, 4)
        q, sq = fk.polar(x)
    ru, rs, rvh = ref.truncated_svd(x, 4)
    flip = torch.sign((u.double() * ru.double()).sum(-2, keepdim=True))
    tol = {"rtol": 1e-4, "atol": 1e-4 if scale > 1e-38 else 1e-2}  # subnormals keep fewer digits
    torch.testing.assert_close((s / rs).double(), torch.ones(2, 4, dtype=torch.float64), **tol)
    torch.testing.assert_close(u.double() * flip, ru.double(), **tol)
    torch.testing.assert_close(vh.double() * flip.mT, rvh.double(), **tol)
    rq, rsq = ref.polar(x)
    torch.testing.assert_close(q.double(), rq.double(), **tol)
    torch.testing.assert_close((sq / rsq).double(), torch.ones(2, 12, dtype=torch.float64), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS[:1] + DT_IDS[-1:])
def test_a_batch_on_several_threads_equals_its_matrices_one_by_one(dtype, capfd):
    """The cpu backend runs LAPACK a matrix per thread, SciPy's OpenBLAS held to one thread meanwhile:
    a batch of tall, wide or square matrices (every route: float32 Gram, float64 Gram, SVD) gives
    each matrix's own result, and SciPy's BLAS gets its thread count back."""
    import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's OpenBLAS before the count)
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before, threads = blas_threads(), torch.get_num_threads()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    try:
        torch.set_num_threads(2)
        for shape in ((5, 30, 12), (5, 12, 30), (5, 16, 16)):
            x = separated(shape, dtype, seed=7)
            with fk.use_backend("cpu"):
                together = (*fk.truncated_svd(x, 4), *fk.polar(x))
                alone = [(*fk.truncated_svd(x[i : i + 1], 4), *fk.polar(x[i : i + 1])) for i in range(5)]
            for got, want in zip(together, [torch.cat(parts) for parts in zip(*alone, strict=True)], strict=True):
                torch.testing.assert_close(got, want, **tol)
            assert_triplets_close(together[:3], ref.truncated_svd(x, 4), dtype)
            torch.testing.assert_close(together[3], ref.polar(x)[0], **TOL[dtype])
        workers = [threading.Thread(target=lambda: [fk.polar(x) for _ in range(20)]) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)
    assert blas_threads() == before
    assert "OpenBLAS Warning" not in capfd.readouterr().err  # its own pool ran inside ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS[:1] + DT_IDS[-1:])
def test_square_polar_by_newton_and_its_fallbacks(dtype, monkeypatch, newton_from_32):
    """Without S, square matrices (from 384², here 32²) take Newton's iteration where κ ≤ 10⁻²/ε:
    κ = 3, a sum of Gaussian matrices (Iso-C's case), κ = 10⁴; κ = 10⁶ only in float64 (float32's
    bound is 8·10⁴: the SVD); a rank-deficient matrix goes by SVD. Float32's Q within 10× the float32
    SVD's distance to the float64 polar factor, closer than it at κ = 10⁴ (float64's: within ε·κ)."""
    from fusion_kernels.ops import low_rank

    n, g = 48, torch.Generator().manual_seed(3)
    gaussian = sum(torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(8))
    x = torch.stack(
        [
            spectrum_matrix((n, n), torch.linspace(1.0, 0.3, n), seed=1),
            gaussian / torch.linalg.matrix_norm(gaussian, ord=2),
            spectrum_matrix((n, n), torch.logspace(0, -4, n), seed=2),
            spectrum_matrix((n, n), torch.logspace(0, -6, n), seed=5),
            spectrum_matrix((n, n), torch.cat([torch.ones(n - 9), torch.zeros(9)]), seed=4),
        ]
    ).to(dtype)
    newton, real = [], low_rank._newton_polar_one
    monkeypatch.setattr(low_rank, "_newton_polar_one", lambda m: newton.append(real(m) is not None) or real(m))
    with fk.use_backend("cpu"):
        q, no_values = fk.polar(x, values=False)
    assert newton == [True, True, True, dtype == torch.float64, False] and no_values is None
    exact_q = ref.polar(x.double())[0]
    svd_error = (ref.polar(x.float())[0].double() - exact_q).abs().amax((-2, -1))
    error = (q.double() - exact_q).abs().amax((-2, -1))
    if dtype == torch.float32:
        assert (error[:4] <= 10 * svd_error[:4]).all() and error[2] <= svd_error[2], (error, svd_error)
    else:  # the float64 SVD's own rounding, ε·κ, is the scale here
        assert (error[:4] <= 1e-9).all(), error
    # the rank-deficient matrix: x = Q·H with Q orthogonal on its range, as the SVD's
    torch.testing.assert_close(q[4].double() @ (q[4].double().mT @ x[4].double()), x[4].double(), rtol=0, atol=1e-5)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(q[4].double().mT @ q[4].double(), eye, rtol=0, atol=1e-5)


def test_polar_of_a_nearly_singular_long_matrix_falls_back_to_the_svd():
    """λ_min < 10⁻⁸·λ_max: the float64 Gram would lose Q's digits; the SVD gives the reference's Q."""
    x = torch.stack(
        [spectrum_matrix((60, 12), torch.logspace(0, -6, 12), seed=5), spectrum_matrix((60, 12), torch.ones(12))]
    )
    with fk.use_backend("cpu"):
        q, s = fk.polar(x)
    rq, rs = ref.polar(x)
    torch.testing.assert_close(q, rq, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, rs, rtol=1e-9, atol=1e-12)


def test_gradients_flow_through_the_reference():
    x = separated((20, 8), torch.float64, seed=4).requires_grad_()
    u, s, vh = fk.truncated_svd(x, 3)
    q, sq = fk.polar(x)
    (s.sum() + (q * x).sum()).backward()
    y = x.detach().clone().requires_grad_()
    ru, rs, rvh = torch.linalg.svd(y, full_matrices=False)
    (rs[:3].sum() + ((ru @ rvh) * y).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_bad_inputs_are_named():
    x = torch.randn(6, 4)
    for call in (lambda a: fk.truncated_svd(a, 2), fk.polar):
        with pytest.raises(ArgumentTypeError, match="'x'"):
            call(x.tolist())
        with pytest.raises(DTypeError, match="'x'"):
            call(x.to(torch.int32))
        with pytest.raises(ShapeError, match=r"'x'.*got shape \(6,\)"):
            call(x[:, 0])
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[2, 1] = bad
            with pytest.raises(WeightError, match="'x' has NaN or infinite"):
                call(y)
    for k in (-1, 5, True, 2.0, None):
        with pytest.raises(ShapeError, match=r"'k' expected an int in \[0, 4\]"):
            fk.truncated_svd(x, k)
    with pytest.raises(ArgumentTypeError, match="'right'"):
        fk.polar(x, right=[[1.0]])
    with pytest.raises(DTypeError, match=r"'right' expected dtype torch.float32"):
        fk.polar(x, right=torch.ones(4, 2, dtype=torch.float64))
    for shape in [(5, 2), (4,), (1, 4, 2)]:
        with pytest.raises(ShapeError, match=r"'right' expected shape \[4, p\]"):
            fk.polar(x, right=torch.ones(shape))
    for bad in (1, None, "no"):
        with pytest.raises(ArgumentTypeError, match="'values' expected a bool, got"):
            fk.polar(x, values=bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(300, 700), (5, 70000), (1, 3), (64, 64)], ids=str)
def test_task_vectors_summed_in_one_pass_give_torchs_bits(dtype, shape):
    """Iso-C's Σᵢ τᵢ, one pass of fk.task_arithmetic(add_base=False) where the sum keeps the base's
    dtype, equals torch's (x₁ − base) + (x₂ − base) + … bit for bit, and with per-model scales (torch's
    ops) too."""
    from modelfusion.average.subspace import _TaskVectors

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(shape, generator=g).to(dtype)}
    models = [{"w": (base["w"].double() + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)}]
    models += [{"w": (models[0]["w"].double() * (1 + 0.1 * i)).to(dtype)} for i in range(1, 5)]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for scales in (None, [0.5, 1.0, 2.0, 1.0, 0.3]):
        tv = _TaskVectors(base, models, scales)
        got = tv.sum_into("w", torch.full(shape, float("nan"), dtype=wide))
        want, scratch = torch.empty(shape, dtype=wide), torch.empty(shape, dtype=wide)
        tv.into(0, "w", want)
        for i in range(1, 5):
            want += tv.into(i, "w", scratch)
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_subspace_merges_equal_their_svd_forms(method, newton_from_32):
    """The subspace merges on fk.truncated_svd/fk.polar against the same merges on the reference's
    SVDs (tensors of every route: square by SVD, long, wide, a tensor below the 2-D ones). A 64²
    tensor, whose polar factors go by Newton's iteration (from 32² here; the side-by-side U of TSV-M
    is ill-conditioned, so both float32 results carry ε·κ): ours no farther from the float64 merge
    than the reference's."""
    from modelfusion import average

    shapes = {"a": (24, 24), "b": (72, 24), "c": (24, 72), "d": (24,), "e": (64, 64)}
    base = {k: torch.randn(s, generator=torch.Generator().manual_seed(1)) for k, s in shapes.items()}
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in base.items()}
        for i in range(2, 6)
    ]
    got = getattr(average, method)(base, models)
    with fk.use_backend("torch"):
        want = getattr(average, method)(base, models)
        wide = [{k: v.double() for k, v in m.items()} for m in (base, *models)]
        exact = getattr(average, method)(wide[0], wide[1:])
    for k in "abcd":
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    error, ref_error = ((t["e"].double() - exact["e"]).abs().max() for t in (got, want))
    assert error <= max(ref_error, 1e-5), (error, ref_error)
