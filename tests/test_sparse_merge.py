"""sparse_merge and its presets: every backend against the reference over the option matrix,
exact counter-based masks, and bad input."""

import itertools
import math
import zlib

import pytest
import torch
from helpers import assert_close, assert_within_reference_error, device, inputs, randn, skip_if_interpreted

import fusion_kernels as fk
from fusion_kernels import reference as ref
from fusion_kernels.reference.sparse_merge import keep_mask_and_probability

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]
SPARSIFY = [None, "magnitude", "random", "magnitude_outliers", "della"]
CONSENSUS = [None, "sum", "count"]
COMBINE = ["sum", "mean_count", "mean_weight"]
RESCALE = [None, "inverse_density", "l1"]


def reference(base, xs, w, **kw):
    n = len(xs)
    per_model = {"density": ("densities", 1.0), "gamma": ("gammas", 0.01), "epsilon": ("epsilons", 0.15)}
    lists = {}
    for key, (plural, default) in per_model.items():
        value = kw.pop(key, default)
        lists[plural] = list(value) if isinstance(value, list) else [value] * n
    opts = {
        "sparsify": "magnitude",
        "rescale": None,
        "consensus": "sum",
        "elect_on": "weighted",
        "combine": "mean_weight",
        "lam": 1.0,
        "seed": 0,
        **kw,
    }
    return ref.sparse_merge(base, xs, w, **lists, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("sparsify, consensus, combine", list(itertools.product(SPARSIFY, CONSENSUS, COMBINE)))
def test_option_matrix_matches_reference(backend, dtype, with_base, sparsify, consensus, combine):
    # 7 rows under Triton's interpreter, whose sort of 33 rows takes 1.5 s a case
    shape = (7, 65) if backend == "triton" and device() == "cpu" else (33, 65)
    base, *xs = inputs(4, shape, dtype, seed=zlib.crc32(repr((sparsify, consensus, combine)).encode()) % 1000)
    base = base if with_base else None
    w = [0.6, -0.3, 1.2]
    rescale = RESCALE[(SPARSIFY.index(sparsify) + COMBINE.index(combine)) % 3]
    elect_on = "unweighted" if consensus == "count" else "weighted"
    kw = dict(
        sparsify=sparsify,
        density=0.4,
        gamma=0.1,
        epsilon=0.2,
        rescale=rescale,
        consensus=consensus,
        elect_on=elect_on,
        combine=combine,
        lam=0.9,
        seed=7,
    )
    if sparsify == "della":  # Triton's DELLA on small shapes: test_triton_della_masks_across_tiles...
        skip_if_interpreted(backend, "DELLA's sort of 65-column rows")
    if sparsify == "della" and rescale == "inverse_density" and backend in ("cpu", "triton"):
        with pytest.raises(fk.BackendError, match="della"):  # per-element 1/p: the torch backend's
            fk.sparse_merge(base, xs, w, **kw)
        return
    assert_within_reference_error(fk.sparse_merge(base, xs, w, **kw), reference, base, xs, w, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n", range(1, 9))
def test_ties_and_dare_for_1_to_8_models(backend, dtype, n):
    base, *xs = inputs(n + 1, (1031,), dtype, seed=n)
    w = [0.5 + 0.1 * i for i in range(n)]
    assert_within_reference_error(fk.ties_merge(base, xs, w, density=0.3), reference, base, xs, w, density=0.3)
    assert_close(
        fk.dare_merge(base, xs, w, density=0.3, seed=n, consensus="sum"),
        reference(base, xs, w, sparsify="random", density=0.3, seed=n, rescale="inverse_density", combine="sum"),
    )


@pytest.mark.parametrize("density", [0.0, 1.0 / 997, 0.5, 1.0])
def test_density_edges_and_per_model_density(backend, density):
    base, *xs = inputs(3, (997,), torch.float32, seed=3)
    assert_within_reference_error(
        fk.ties_merge(base, xs, density=density), reference, base, xs, [1.0, 1.0], density=density
    )
    assert_close(
        fk.ties_merge(base, xs, density=[density, 0.25]), reference(base, xs, [1.0, 1.0], density=[density, 0.25])
    )


def test_dare_mask_is_the_counter_hash(backend):
    (x,) = inputs(1, (300_007,), torch.float32)
    got = fk.dare_merge(None, [x], density=0.3, seed=123)  # rescale: 1/density
    assert torch.equal(got != 0, ref.random_keep_mask(x.shape, 0.3, seed=123, model=0, device=x.device))
    rate = float((got != 0).double().mean())
    sd = math.sqrt(0.3 * 0.7 / x.numel())
    assert abs(rate - 0.3) < 5 * sd, rate
    kept = got != 0
    assert torch.equal(got[kept], (x[kept] / 0.3)), "kept values are rescaled by 1/density"


def test_dare_masks_of_models_and_seeds_are_independent():
    n, p = 400_000, 0.3
    masks = [ref.random_keep_mask((n,), p, seed=s, model=m) for s, m in [(0, 0), (0, 1), (0, 2), (1, 0)]]
    sd = math.sqrt(p * p * (1 - p * p) / n)
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            both = float((masks[a] & masks[b]).double().mean())
            assert abs(both - p * p) < 5 * sd, (a, b, both)
    # neighbouring elements are not correlated either, nor the two that share a hash (8 apart)
    m = masks[0]
    for gap in (1, 8):
        assert abs(float((m[gap:] & m[:-gap]).double().mean()) - p * p) < 5 * sd, gap


def test_dare_masks_do_not_depend_on_threads():
    base, *xs = inputs(3, (400_001,), torch.bfloat16)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fk.dare_merge(base, xs, density=0.2, seed=5, consensus="sum", rescale="l1"))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_explicit_masks(backend):
    base, *xs = inputs(3, (50, 20), torch.float32)
    masks = [torch.rand(50, 20) < 0.5 for _ in xs]
    got = fk.dare_merge(base, xs, density=0.5, masks=masks)
    expected = base + sum(torch.where(m, (x - base) / 0.5, 0.0) for m, x in zip(masks, xs, strict=True))
    assert_close(got, expected)


def test_hand_worked_ties(backend):
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, -2.0, 3.0, 0.1]), torch.tensor([-1.0, -1.0, 2.0, -0.2])]
    # density 0.75 keeps 3 of 4 per model: model 0 drops 0.1, model 1 drops -0.2
    got = fk.ties_merge(base, xs, density=0.75, elect_on="unweighted", combine="mean_count")
    # elem0: 1 vs -1 -> sum 0 -> elected +: only 1 agrees -> 1; elem1: -2, -1 -> -1.5; elem2: 2.5; elem3: 0
    assert_close(got, torch.tensor([1.0, -1.5, 2.5, 0.0]))
    # ties at the threshold: [2, 1, 1, 1] at density 0.5 keeps 2 and the first 1
    tied = fk.ties_merge(None, [torch.tensor([2.0, 1.0, 1.0, 1.0])], density=0.5)
    assert torch.equal(tied, torch.tensor([2.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (257,), (1, 1), (37, 1), (9, 300), (6, 2), (5, 5), (4, 7), (3, 10)], ids=str)
def test_della_masks_equal_the_reference_bit_for_bit(dtype, shape):
    """The C++ DELLA masks, read through the merge: with one-hot weights, no election, no rescale and
    ``combine="sum"``, the merged task vector is nonzero exactly where model i keeps a nonzero τ
    (with a base: the result equals the reference's bit for bit)."""
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    base, *xs = inputs(4, shape, dtype, seed=sum(shape))
    xs[1] = (xs[1] * 4).round() / 4  # many equal magnitudes: ties are ranked by index
    densities, epsilons = [0.3, 0.5, 0.7], [0.1, 0.2, 0.3]
    for b in (base, None):
        for i, x in enumerate(xs):
            options = dict(sparsify="della", density=densities, epsilon=epsilons, consensus=None, combine="sum")
            options["seed"] = 11
            weights = [float(j == i) for j in range(len(xs))]
            with fk.use_backend("cpu"):
                got = fk.sparse_merge(b, xs, weights, **options)
            if b is None:
                expected, _ = keep_mask_and_probability(x, i, "della", densities[i], 0.0, epsilons[i], 11)
                assert torch.equal(got != 0, expected & (x != 0)), i
            else:
                assert torch.equal(got, reference(b, xs, weights, **options)), i


@pytest.mark.parametrize("run", [5, 40, 1500], ids=lambda n: f"run{n}")
def test_della_ranks_runs_that_differ_only_below_their_top_bytes(run):
    """The C++ ranking sorts by the two highest bytes in which a row's keys differ, then the runs
    equal in those by the lower bytes (insertion for a short run, counting passes for a long one):
    a row with `run` magnitudes 1 + a·2⁻²³ (they differ in the low bytes only), ties among them, and
    the rest spread over many exponents gives the reference's masks bit for bit."""
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    g = torch.Generator().manual_seed(run)
    cols = 2048
    low = 1.0 + torch.randint(0, 1 << 12, (run,), generator=g).double() * 2.0**-23
    low[: run // 3] = low[0]  # ties, ranked by index
    spread = 2.0 ** -torch.randint(0, 40, (cols - run,), generator=g).double() * (
        1 + torch.rand(cols - run, generator=g)
    )
    row = torch.cat([low, spread])[torch.randperm(cols, generator=g)]
    x = (row * torch.where(torch.rand(cols, generator=g) < 0.5, -1.0, 1.0)).float().reshape(2, cols // 2)
    for i, density in enumerate([0.3, 0.5]):
        options = dict(sparsify="della", density=density, epsilon=0.2, consensus=None, combine="sum", seed=5)
        with fk.use_backend("cpu"):
            got = fk.sparse_merge(None, [x], [1.0], first_model=i, **options)
        expected, _ = keep_mask_and_probability(x, i, "della", density, 0.0, 0.2, 5)
        assert torch.equal(got != 0, expected), i


@pytest.mark.parametrize("row", ["bf16_tune", "mostly_zero", "outlier", "two_outliers"])
def test_della_ranks_rows_of_many_binades(row):
    """Keys over many binades take the coarse digit (slices of the keys' range), which decides most
    draws, and count the keys of one digit for the rest; a row whose keys crowd a few digits (an
    outlier stretching the range) is ranked whole. Either way the reference's masks bit for bit."""
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    g = torch.Generator().manual_seed(len(row))
    t = 0.02 * torch.randn(6, 2048, generator=g)
    base = t.bfloat16()
    x = (t + 0.002 * torch.randn(6, 2048, generator=g)).bfloat16()  # τ = 0 in ~2% of elements
    if row == "mostly_zero":
        x = torch.where(torch.rand(6, 2048, generator=g) < 0.7, base, x)
    if row in ("outlier", "two_outliers"):
        x[:, 17] = 50.0
    if row == "two_outliers":
        x[:, 1000] = -3.0
    for density, epsilon in [(0.4, 0.1), (0.5, 0.3)]:
        options = dict(sparsify="della", density=density, epsilon=epsilon, consensus=None, combine="sum", seed=3)
        with fk.use_backend("cpu"):
            got = fk.sparse_merge(base, [x], [1.0], **options)
        assert torch.equal(got, reference(base, [x], [1.0], **options)), (density, epsilon)


@pytest.mark.parametrize("span", [1, 8, 9, 10, 11, 17])
def test_della_ranks_keys_that_differ_in_a_few_bits(span):
    """Keys that differ only in `span` bits are ranked by one counting pass as narrow as those bits
    (up to 10), else by bytes: either way the reference's masks bit for bit (ties by index)."""
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    g = torch.Generator().manual_seed(span)
    low = 23 - span if span <= 23 else 0
    digits = torch.randint(0, 1 << span, (3, 700), generator=g)
    digits[:, :2] = torch.tensor([0, (1 << span) - 1])  # every bit of the span varies
    digits[:, 100:160] = digits[:, 99:100]  # a run of ties
    keys = (0x3F800000 | (digits << low)).to(torch.int32)  # 1.0 ≤ |x| < 2, mantissa bits only
    x = keys.view(torch.float32) * torch.where(torch.rand(3, 700, generator=g) < 0.5, -1.0, 1.0)
    options = dict(sparsify="della", density=0.5, epsilon=0.3, consensus=None, combine="sum", seed=9)
    with fk.use_backend("cpu"):
        got = fk.sparse_merge(None, [x], [1.0], **options)
    expected, _ = keep_mask_and_probability(x, 0, "della", 0.5, 0.0, 0.3, 9)
    assert torch.equal(got != 0, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_della_l1_rescale_summed_with_the_masks_is_the_references_and_thread_free(dtype):
    """With l1 rescaling the C++ DELLA sums each model's |τ| and kept |τ| row by row as it draws the
    masks (no second pass): the merge is the reference's within its rounding, and bit for bit the
    same for 1, 2 and 3 threads."""
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    base, *xs = inputs(3, (70, 333), dtype, seed=4)
    kw = dict(density=[0.4, 0.6], epsilon=[0.1, 0.2], seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with fk.use_backend("cpu"):
                results.append(fk.della_merge(base, xs, [0.7, 0.5], **kw))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])
    options = dict(sparsify="della", rescale="l1", consensus="sum", combine="mean_weight", **kw)
    assert_within_reference_error(results[0], reference, base, xs, [0.7, 0.5], **options)


def test_della_cpu_declines_what_it_cannot_rank_and_automatic_dispatch_falls_back():
    base, *xs = inputs(3, (4, 5, 6), torch.float32)
    expected = reference(base, xs, [1.0, 1.0], sparsify="della", density=0.5, epsilon=0.1, rescale="l1")
    got = fk.della_merge(base, xs, density=0.5, epsilon=0.1)  # automatic: a 3-D tensor runs on torch
    assert_close(got, expected)
    if "cpu" in fk.available_backends():
        with fk.use_backend("cpu"), pytest.raises(fk.BackendError, match="1-D and 2-D"):
            fk.della_merge(base, xs, density=0.5, epsilon=0.1)
        with fk.use_backend("cpu"), pytest.raises(fk.BackendError, match="inverse_density"):
            fk.della_merge(base[0], [x[0] for x in xs], density=0.5, epsilon=0.1, rescale="inverse_density")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1,), (37,), (5, 1), (6, 21)], ids=str)
@pytest.mark.parametrize("tile", [4096, 32], ids=lambda t: f"tile{t}")
def test_triton_della_masks_across_tiles_equal_the_reference(dtype, shape, tile, monkeypatch):
    """Triton ranks DELLA magnitudes tile by tile: with a 32-element tile a row spans several."""
    pytest.importorskip("triton")
    from fusion_kernels.triton.sparse_merge import della_masks

    monkeypatch.setattr("fusion_kernels.triton.sparse_merge.DELLA_TILE", tile)
    on = "cuda" if torch.cuda.is_available() else "cpu"
    base, *xs = (x.to(on) for x in inputs(4, shape, dtype, seed=sum(shape)))
    xs[1] = (xs[1] * 4).round() / 4  # ties, ranked by index
    densities, epsilons = [0.3, 0.5, 0.7], [0.1, 0.2, 0.3]
    for b in (base, None):
        masks = della_masks(b, xs, densities, epsilons, 11)
        for i, x in enumerate(xs):
            tau = x.float() - b.float() if b is not None else x
            expected = keep_mask_and_probability(tau, i, "della", densities[i], 0.0, epsilons[i], 11)[0]
            assert torch.equal(masks[i], expected)
    if tile == 32:
        kw = dict(sparsify="della", density=0.4, epsilon=0.2, seed=3, consensus="sum", combine="mean_count")
        with fk.use_backend("triton"):
            got = fk.sparse_merge(base, xs, [0.5, 1.0, 0.7], rescale="l1", **kw)
        assert_close(got, reference(base, xs, [0.5, 1.0, 0.7], rescale="l1", **kw))


def test_triton_della_declines_what_it_cannot_rank():
    pytest.importorskip("triton")
    x = torch.ones(2, 3, 4, device="cuda" if torch.cuda.is_available() else "cpu")
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="1-D and 2-D"):
        fk.della_merge(x, [x, x], density=0.5)
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="inverse_density"):
        fk.della_merge(x[0], [x[0], x[0]], density=0.5, rescale="inverse_density")


@pytest.mark.parametrize("op_name", ["sparse_merge", "sparse_merge_out"])
def test_opcheck(op_name):
    base, *xs = inputs(3, (6, 7), torch.float32)
    args = (
        base,
        xs,
        [1.0, 0.5],
        "magnitude",
        "",
        "sum",
        "weighted",
        "mean_weight",
        [0.5, 0.5],
        [0.0, 0.0],
        [0.1, 0.1],
        1.0,
        0,
        [0.0, 0.0],
        1,
        0,
        [],
    )
    args += (torch.zeros(6, 7),) if op_name.endswith("_out") else ()
    torch.library.opcheck(getattr(torch.ops.fusion_kernels, op_name).default, args)


X = [randn((4, 5), torch.float32, seed=i) for i in range(3)]


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda o: fk.sparse_merge(X[0], X[1:], sparsify="topk", out=o), fk.ArgumentTypeError, "'sparsify'"),
        (lambda o: fk.sparse_merge(X[0], X[1:], consensus="vote", out=o), fk.ArgumentTypeError, "'consensus'"),
        (lambda o: fk.sparse_merge(X[0], X[1:], combine="avg", out=o), fk.ArgumentTypeError, "'combine'"),
        (lambda o: fk.ties_merge(X[0], X[1:], density=1.5, out=o), fk.WeightError, "'density[0]'"),
        (lambda o: fk.ties_merge(X[0], X[1:], density=[0.5], out=o), fk.WeightError, "'density'"),
        (lambda o: fk.della_merge(X[0], X[1:], density=0.1, epsilon=0.2, out=o), fk.WeightError, "'epsilon[0]'"),
        (lambda o: fk.dare_merge(X[0], X[1:], density=0.0, out=o), fk.WeightError, "'density'"),
        (lambda o: fk.dare_merge(X[0], X[1:], density=0.5, seed=-1, out=o), fk.ArgumentTypeError, "'seed'"),
        (lambda o: fk.ties_merge(X[0], X[1:], density=0.5, lam=float("nan"), out=o), fk.WeightError, "'lam'"),
        (lambda o: fk.ties_merge(X[0].half(), X[1:], density=0.5, out=o), fk.DTypeError, "'xs[0]'"),
        (
            lambda o: fk.dare_merge(X[0], X[1:], density=0.5, masks=[torch.ones(4, 5)] * 2, out=o),
            fk.ShapeError,
            "'masks[0]'",
        ),
        (
            lambda o: fk.dare_merge(X[0], X[1:], density=0.5, masks=[torch.ones(4, 5, dtype=torch.bool)], out=o),
            fk.ShapeError,
            "'masks'",
        ),
    ],
    ids=[
        "sparsify",
        "consensus",
        "combine",
        "density>1",
        "density-count",
        "della-eps",
        "dare-d0",
        "seed",
        "lam-nan",
        "dtype",
        "mask-dtype",
        "mask-count",
    ],
)
def test_bad_input_raises_before_writing(call, error, argument):
    out = torch.full((4, 5), 7.0)
    with pytest.raises(error) as info:
        call(out)
    assert argument in str(info.value), str(info.value)
    assert torch.all(out == 7.0)


def test_the_native_l1_rescale_cutoff_is_the_references():
    if "cpu" not in fk.available_backends():
        pytest.skip("the C++ extension is not available")
    from fusion_kernels import _native
    from fusion_kernels.reference.sparse_merge import L1_RESCALE_EPS

    assert _native.lib().L1_RESCALE_EPS == L1_RESCALE_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_della_ranks_rows_of_every_key_spread_as_the_reference(backend, dtype):
    """DELLA's row ranking on rows that take each path of the cpu backend's sort: spread keys (a few
    per bucket), a huge outlier (every other key in a few buckets: sorted whole), all keys equal,
    five distinct values (long runs of ties, kept in index order), and one-column rows."""
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(2048, generator=g)
    outlier = torch.randn(2048, generator=g).index_fill_(0, torch.tensor([17]), 1e6)
    equal = torch.full((2048,), 0.25)
    discrete = torch.randint(-2, 3, (2048,), generator=g).float() * 0.125
    rows = torch.stack([spread, outlier, equal, discrete]).to(dtype).to(device())
    kw = dict(sparsify="della", density=0.5, epsilon=0.3, rescale=None, consensus=None, combine="sum", seed=5)
    skip_if_interpreted(backend, "DELLA's sort of 2048-column rows")
    for tau in (rows, rows[:, :1].contiguous()):
        got = fk.sparse_merge(None, [tau], [1.0], **kw)
        expected = reference(None, [tau.cpu()], [1.0], **kw)
        assert got.dtype == dtype and torch.equal(got.cpu(), expected)
        assert 0 < int(torch.count_nonzero(got)) < tau.numel() or tau.shape[1] == 1


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.0), (0.6, 0.4), (0.1, 0.1), (0.5, 0.5)])
def test_della_draws_that_every_rank_decides(backend, density, epsilon):
    """A draw below the first rank's threshold is kept and one at or above the last rank's dropped
    without a rank: with epsilon 0 no element needs its rank; with p reaching 0 or 1 at the first or
    last rank every draw or none is decided that way: the reference's masks bit for bit, on rows of
    every key spread."""
    g = torch.Generator().manual_seed(int(density * 100 + epsilon * 10))
    rows = torch.stack([torch.randn(1001, generator=g), torch.full((1001,), 0.5), torch.randn(1001, generator=g) ** 9])
    kw = dict(sparsify="della", density=density, epsilon=epsilon, rescale=None, consensus=None, combine="sum", seed=7)
    skip_if_interpreted(backend, "DELLA's sort of 1001-column rows")
    tau = rows.to(device())
    got = fk.sparse_merge(None, [tau], [1.0], **kw)
    assert torch.equal(got.cpu(), reference(None, [tau.cpu()], [1.0], **kw))
