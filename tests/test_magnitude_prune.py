"""magnitude_prune / magnitude_threshold: exact top-k with the tie rule, every backend."""

import pytest
import torch
from helpers import device, randn, skip_if_interpreted

import fusion_kernels as fk
from fusion_kernels import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,), (3, 17, 5), (300, 301)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.999, 1.0])
def test_prune_matches_reference_exactly(backend, dtype, shape, density):
    if len(shape) == 2:  # blocks of equal values: test_thirteen_values_over_twenty_thousand_elements
        skip_if_interpreted(backend, "top-k of 90K elements")
    x = randn(shape, dtype, seed=sum(shape))
    k = int(density * x.numel())
    got = fk.magnitude_prune(x, density)
    assert torch.equal(got, ref.magnitude_prune(x, k))
    assert int((got != 0).sum()) == k


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_ties_keep_lowest_index_first(backend, dtype):
    # 1000 copies of 0.5 and 10 larger values: the cut-off falls inside the run of equal values.
    x = torch.full((5000,), 0.5, dtype=dtype)
    x[::7] = 0.25
    x[[3, 999, 4000]] = torch.tensor([2.0, -3.0, 4.0], dtype=dtype)
    for k in (1, 3, 4, 17, 1000, 4283, 4284, 4285, 5000):
        got = fk.magnitude_prune(x, k=k)
        expected = ref.magnitude_prune(x, k)
        assert torch.equal(got, expected), k
    kept = fk.magnitude_prune(x, k=20) != 0
    assert kept[[3, 999, 4000]].all() and int(kept.sum()) == 20
    # the 17 other survivors are the first 0.5s: indices that are not multiples of 7 (those hold 0.25)
    survivors = [j for j in range(21) if j % 7 and j != 3][:17]
    assert kept.nonzero().flatten().tolist() == sorted([*survivors, 3, 999, 4000])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_thirteen_values_over_twenty_thousand_elements(backend, dtype):
    # every cut-off lands in a run of equal values that spans many of a kernel's blocks
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-6, 7, (20_001,), generator=g) / 4).to(dtype).to(device())
    for k in (0, 1, 1000, 10_000, 19_999, 20_001):
        assert torch.equal(fk.magnitude_prune(x, k=k), ref.magnitude_prune(x, k)), k
        if k:
            assert torch.equal(fk.magnitude_threshold(x, k=k), ref.magnitude_threshold(x, k)), k
    assert fk.magnitude_prune(torch.empty(0, 3, dtype=dtype, device=device()), 0.5).shape == (0, 3)


def test_zeros_nan_and_inf(backend):
    x = torch.tensor([0.0, float("nan"), -float("inf"), 1.0, -0.0, 2.0, 0.0])
    assert torch.equal(fk.magnitude_prune(x, k=1).isnan(), x.isnan())
    got = fk.magnitude_prune(x, k=2)
    assert got.isnan()[1] and got[2] == -float("inf") and int((got[~got.isnan()] != 0).sum()) == 1
    assert torch.equal(fk.magnitude_prune(x, k=6) != 0, torch.tensor([False, True, True, True, False, True, False]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("k", [1, 2, 100, 999, 1000])
def test_threshold_matches_sorting(backend, dtype, k):
    x = randn((1000,), dtype, seed=k)
    expected = x.abs().float().sort(descending=True).values[k - 1].to(dtype)
    assert torch.equal(fk.magnitude_threshold(x, k=k), expected)


def test_large_tensor_threads_do_not_change_result():
    x = randn((1 << 20,), torch.float32, seed=1).round(decimals=2)  # many ties
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fk.magnitude_prune(x, 0.3))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert torch.equal(results[0], ref.magnitude_prune(x, int(0.3 * x.numel())))


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda x: fk.magnitude_prune(x, 1.5), fk.WeightError, "'density[0]'"),
        (lambda x: fk.magnitude_prune(x, -0.1), fk.WeightError, "'density[0]'"),
        (lambda x: fk.magnitude_prune(x), fk.WeightError, "'density' and 'k'"),
        (lambda x: fk.magnitude_prune(x, 0.5, k=3), fk.WeightError, "'density' and 'k'"),
        (lambda x: fk.magnitude_prune(x, k=11), fk.WeightError, "'k'"),
        (lambda x: fk.magnitude_prune(x.int(), 0.5), fk.DTypeError, "'x'"),
        (lambda x: fk.magnitude_prune([1.0], 0.5), fk.ArgumentTypeError, "'x'"),
        (lambda x: fk.magnitude_threshold(x, k=0), fk.WeightError, "k >= 1"),
    ],
    ids=["density>1", "density<0", "neither", "both", "k>n", "int", "list", "threshold-k0"],
)
def test_bad_input(call, error, argument):
    x = torch.randn(10)
    before = x.clone()
    with pytest.raises(error) as info:
        call(x)
    assert argument in str(info.value)
    assert torch.equal(x, before)


def test_opcheck():
    x = torch.randn(33, 7)
    torch.library.opcheck(torch.ops.fusion_kernels.magnitude_prune.default, (x, 50))
    torch.library.opcheck(torch.ops.fusion_kernels.magnitude_threshold.default, (x, 50))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_quantised_values_shared_by_many_elements(dtype):
    """Task vectors of 16-bit fine-tunes take few distinct values, each shared by thousands of
    elements: the k-th value is a bracket end (counted per block) or inside it (collected)."""
    g = torch.Generator().manual_seed(3)
    n = 300_007  # more than one thread's share, several 64K blocks
    base = (torch.randn(n, generator=g) * 4).round().to(dtype)
    x = (base.float() + torch.randint(-40, 41, (n,), generator=g).float() / 8).to(dtype)
    tau = x.float() - base.float()
    for density in (0.013, 0.05, 0.2, 0.31, 0.5, 0.77, 0.9):
        k = int(density * n)
        expected = base + ref.magnitude_prune(tau, k).to(dtype)
        assert torch.equal(fk.ties_merge(base, [x], density=density), expected), density
        assert torch.equal(fk.magnitude_prune(x, density), ref.magnitude_prune(x, k)), density


def sample_positions(n: int) -> torch.Tensor:
    """Where the C++ select samples keys (magnitude_select.cpp's sample_position): n/64 of them, within
    [2^13, 2^18] (all when n is smaller), in runs of 16 neighbours, each run in its own window of n/runs
    and shifted within it by a Weyl sequence."""
    samples = max(1 << 13, min(n >> 6, 1 << 18))
    if samples >= n:
        return torch.arange(n, dtype=torch.int64)
    runs = samples // 16
    run = torch.arange(runs, dtype=torch.int64)
    shift = ((run * 0x9E3779B9) % 2**32) * (n // runs - 16 + 1) // 2**32
    starts = run * n // runs + shift
    return (starts[:, None] + torch.arange(16, dtype=torch.int64)).flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n", [100_003, 1_000_003, 20_000_003])
def test_radix_fallback_when_the_sample_misses(dtype, n):
    """Zeros at every strided sample position and data elsewhere: the sampled bracket is wrong, so
    the radix select must answer."""
    x = randn((n,), torch.float32, seed=4)
    x[sample_positions(n)] = 0.0
    x = x.to(dtype)
    for k in (1, 1000, n // 2, n - n // 3):
        assert torch.equal(fk.magnitude_prune(x, k=k), ref.magnitude_prune(x, k)), k


@pytest.mark.slow
def test_radix_fallback_on_mostly_equal_values():
    """4M zeros and a few values: the k-th key is zero (counted per block) or among the few."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4_000_000)
    x[torch.randint(0, x.numel(), (3000,), generator=g)] = torch.randn(3000, generator=g).round(decimals=1)
    for k in (1, 1000, 2500, 5000, 4_000_000 - 1):
        assert torch.equal(fk.magnitude_prune(x, k=k), ref.magnitude_prune(x, k)), k
        assert torch.equal(fk.magnitude_prune(x.bfloat16(), k=k), ref.magnitude_prune(x.bfloat16(), k)), k
