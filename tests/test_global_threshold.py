"""The model-wide TIES pieces: global_magnitude_threshold against a concatenated kthvalue, sparse_merge's
``"threshold"`` keep and ``tie_sign`` against the reference on every backend, sign_tally, and
ties_global's fused path against its streaming torch path."""

import pytest
import torch
from helpers import assert_refused, assert_within_reference_error, device, randn
from modelfusion import average

import fusion_kernels as fk
from fusion_kernels import reference as ref

DTYPES3 = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = [str(d).removeprefix("torch.") for d in DTYPES3]
SHAPES = [(37, 11), (4099,), (0, 5), (3, 1, 7)]


def _model(dtype, seed, scale=1.0):
    return [randn(s, dtype, seed + i, scale) for i, s in enumerate(SHAPES)]


def _kth_largest(tensors, bases, k):
    keys = torch.cat(
        [
            (x.float() - (0 if b is None else b.float())).abs().reshape(-1).cpu()
            for x, b in zip(tensors, bases, strict=True)
        ]
    )
    return torch.sort(keys, descending=True).values[k - 1]


@pytest.mark.parametrize("dtype", DTYPES3, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [False, True])
def test_global_threshold_is_the_kth_largest_over_all_tensors(backend, dtype, with_base):
    models = [_model(dtype, 10 * m) for m in range(3)]
    base = _model(dtype, 100, 0.5) if with_base else None
    total = sum(x.numel() for x in models[0])
    ks = [1, total // 5, total]
    got = fk.global_magnitude_threshold(models, ks, base=base)
    assert got.dtype == torch.float32 and got.shape == (3,)
    for m, k in enumerate(ks):
        assert float(got[m]) == float(_kth_largest(models[m], base or [None] * len(SHAPES), k))
    single = fk.global_magnitude_threshold(models[1], ks[1], base=base)
    assert single.shape == () and float(single) == float(got[1])


def test_global_threshold_ties_and_nan(backend):
    """Equal magnitudes (of both signs) and NaN, which ranks above every number."""
    x = torch.tensor([1.0, -1.0, 1.0, 2.0, float("nan"), 0.5], device=device())
    assert float(fk.global_magnitude_threshold([x[:3], x[3:]], 4)) == 1.0
    assert float(fk.global_magnitude_threshold([x[:3], x[3:]], 2)) == 2.0
    assert torch.isnan(fk.global_magnitude_threshold([x], 1))


@pytest.mark.parametrize("dtype", DTYPES3, ids=DT_IDS)
@pytest.mark.parametrize("tie_sign", [1, -1, 0])
@pytest.mark.parametrize("combine", ["sum", "mean_count", "max"])
def test_sparse_merge_threshold_matches_reference(backend, dtype, tie_sign, combine):
    if backend == "triton" and (combine == "max" or tie_sign == 0):
        pytest.skip("the Triton kernel sums the agreeing (it declines max and tie_sign=0)")
    base = randn((33, 65), dtype, 1, 0.01)
    xs = [randn((33, 65), dtype, 2 + i, 0.1) for i in range(3)]
    xs.append(2 * base - xs[0])  # τ₃ = −τ₀ exactly: where only these two keep, the tally is 0
    thresholds = [0.05, 0.1, 0.2, 0.05]
    kw = dict(sparsify="threshold", threshold=thresholds, consensus="sum", elect_on="unweighted", combine=combine)
    got = fk.sparse_merge(base, xs, None, lam=0.7, tie_sign=tie_sign, **kw)

    def expected(*args):
        return ref.sparse_merge(
            *args,
            densities=[1.0] * 4,
            gammas=[0.0] * 4,
            epsilons=[0.0] * 4,
            rescale=None,
            consensus="sum",
            elect_on="unweighted",
            combine=combine,
            lam=0.7,
            seed=0,
            sparsify="threshold",
            thresholds=thresholds,
            tie_sign=tie_sign,
        )

    assert_within_reference_error(got, expected, base, xs, [1.0] * 4)
    other = fk.sparse_merge(base, xs, None, lam=0.7, tie_sign=-1 if tie_sign == 1 else 1, **kw)
    assert not torch.equal(got, other)  # the cancelled elements follow the tie


@pytest.mark.parametrize("dtype", DTYPES3, ids=DT_IDS)
def test_threshold_keeps_exactly_at_and_above(backend, dtype):
    """|τ| ≥ threshold exactly, also where the threshold is not representable in the key's dtype."""
    x = torch.tensor([0.1, -0.1, 0.2, 0.05, -0.3], dtype=dtype, device=device())
    for threshold in (float(x[0].abs()), 0.1000001, 0.0999999, 0.0):
        got = fk.sparse_merge(None, [x], sparsify="threshold", threshold=threshold, consensus=None, combine="sum")
        keep = x.double().abs() >= threshold
        assert torch.equal(got, torch.where(keep, x, torch.zeros_like(x))), threshold


@pytest.mark.parametrize("dtype", DTYPES3, ids=DT_IDS)
def test_sign_tally_matches_reference(backend, dtype):
    base = randn((4099,), dtype, 3, 0.01)
    xs = [randn((4099,), dtype, 4 + i, 0.1) for i in range(3)]
    xs.append(2 * base - xs[0])
    cuts = [0.05, 0.1, 0.2, 0.05]
    got = fk.sign_tally(base, xs, cuts)
    assert got == ref.sign_tally(base.cpu(), [x.cpu() for x in xs], cuts)
    assert got[1] > 0  # the cancelled pairs


def _pool(seed, n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (40, 30), "a.bias": (40,), "b.weight": (30, 40), "steps": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["steps"] = torch.tensor(3)
    models = [
        {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(n)
    ]
    models.append({k: 2 * v - models[0][k] if v.is_floating_point() else v for k, v in base.items()})
    cast = lambda s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}  # noqa: E731
    return cast(base), [cast(m) for m in models]


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 0.5, 0.0])
def test_ties_global_fused_equals_streaming_path(merge_func, threshold):
    """The engine path against the streaming torch one (an identity ``drop`` takes that path)."""
    base, models = _pool(5)
    fused = average.ties_global(base, models, threshold, merge_func, 0.3, remove_keys=["b.weight"])
    streaming = average.ties_global(
        base, models, threshold, merge_func, 0.3, remove_keys=["b.weight"], drop=lambda i, k, tau: tau
    )
    for k in base:
        assert torch.allclose(fused[k].float(), streaming[k].float(), rtol=1e-6, atol=1e-6), k
    assert torch.equal(fused["b.weight"], base["b.weight"]) and torch.equal(fused["steps"], base["steps"])


def test_ties_global_majority_of_a_cancelled_pool():
    """Two task vectors that cancel everywhere: FusionBench's majority is 0, so σ = 0 keeps the negatives."""
    base, models = _pool(6, n=1)
    base = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in base.items()}
    models[1] = {k: -v if v.is_floating_point() else v for k, v in models[0].items()}
    assert fk.sign_tally(base["a.weight"], [m["a.weight"] for m in models], [0.0, 0.0]) == (0, 40 * 30)
    fused = average.ties_global(base, models, 50, "sum", 1.0)
    streaming = average.ties_global(base, models, 50, "sum", 1.0, drop=lambda i, k, tau: tau)
    for k in base:
        assert torch.equal(fused[k], streaming[k]), k
    floats = [k for k in base if base[k].is_floating_point()]
    total = sum(base[k].numel() for k in floats)
    cut = fk.global_magnitude_threshold([models[0][k] for k in floats], int(total * 0.5) + 1)  # FusionBench's rank
    kept = models[0]["a.weight"].abs() >= cut
    assert torch.equal(fused["a.weight"], torch.where(kept, -models[0]["a.weight"].abs(), 0.0))
    # max multiplies by σ = 0 instead: nothing moves
    fused = average.ties_global(base, models, 50, "max", 1.0)
    streaming = average.ties_global(base, models, 50, "max", 1.0, drop=lambda i, k, tau: tau)
    assert all(torch.equal(fused[k], streaming[k]) for k in base)
    assert torch.equal(fused["a.weight"], base["a.weight"])


def test_opcheck():
    xs, bases = (
        [torch.randn(5, 6), torch.randn(5, 6), torch.randn(7), torch.randn(7)],
        [torch.randn(5, 6), torch.randn(7)],
    )
    torch.library.opcheck(torch.ops.fusion_kernels.global_magnitude_threshold.default, (xs, bases, 2, [3, 37]))


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda a: fk.global_magnitude_threshold([a], 0), fk.WeightError, "'k'"),
        (lambda a: fk.global_magnitude_threshold([a], a.numel() + 1), fk.WeightError, "'k'"),
        (lambda a: fk.global_magnitude_threshold([[a], [a, a]], 1), fk.ShapeError, "'models[1]'"),
        (lambda a: fk.global_magnitude_threshold([[a], [a[:1]]], 1), fk.ShapeError, "'models[1][0]'"),
        (lambda a: fk.global_magnitude_threshold([[a], [a.half()]], 1), fk.DTypeError, "'models[1][0]'"),
        (lambda a: fk.global_magnitude_threshold([a], 1, base=[a, a]), fk.ShapeError, "'base'"),
        (lambda a: fk.global_magnitude_threshold([], 1), fk.ShapeError, "'models'"),
        (lambda a: fk.sparse_merge(a, [a], sparsify="threshold", threshold=-1.0), fk.WeightError, "'threshold[0]'"),
        (lambda a: fk.sparse_merge(a, [a], tie_sign=2), fk.WeightError, "'tie_sign'"),
        (
            lambda a: fk.sparse_merge(a, [a], sparsify="threshold", rescale="inverse_density"),
            fk.WeightError,
            "inverse_density",
        ),
        (lambda a: fk.sign_tally(a, [a, a], [0.1]), fk.WeightError, "'threshold'"),
        (lambda a: fk.sparse_merge(a, [a], consensus=None, combine="max"), fk.WeightError, "consensus"),
    ],
    ids=[
        "k-zero",
        "k-large",
        "count",
        "shape",
        "dtype",
        "base-count",
        "empty",
        "neg",
        "tie",
        "rescale",
        "tally",
        "max",
    ],
)
def test_bad_input(call, error, argument):
    assert_refused(call, error, argument)


@pytest.mark.parametrize("sparsify", ["random", "della"])
def test_first_model_draws_that_models_stream(backend, sparsify):
    """One model's draws alone (first_model=i) equal its draws in a call with all the models (5×9:
    Triton's interpreter sorts a 17×33 DELLA tile in 2 s)."""
    xs = [randn((5, 9), torch.float32, 20 + i) for i in range(3)]
    kw = dict(sparsify=sparsify, density=0.6, epsilon=0.2, rescale=None, consensus=None, combine="sum", seed=7)
    together = [
        fk.sparse_merge(None, [x if j == i else torch.zeros_like(x) for j, x in enumerate(xs)], **kw) for i in range(3)
    ]
    for i in range(3):
        alone = fk.sparse_merge(None, [xs[i]], first_model=i, **kw)
        assert torch.equal(alone, together[i])
    assert not torch.equal(fk.sparse_merge(None, [xs[1]], first_model=0, **kw), together[1])


def test_dare_drop_on_the_engine_equals_its_call():
    drop = average.dare_drop(0.7, seed=3, names={"a.weight"})
    tau = torch.randn(40, 30)
    for i in range(3):
        scratch = tau.clone()
        got = drop.engine(i, "a.weight", scratch)  # written over the caller's temporary
        assert got is scratch and torch.equal(got, drop(i, "a.weight", tau))
    assert torch.equal(drop.engine(1, "a.bias", tau.clone()), tau)  # not among the names: kept whole


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_ties_fused_equals_streaming_path(merge_func, rescale):
    base, models = _pool(8)
    drop = average.dare_drop(0.5, rescale=rescale, seed=11, names={"a.weight", "b.weight"})
    fused = average.ties_global(base, models, 20, merge_func, 0.4, drop=drop)
    streaming = average.ties_global(base, models, 20, merge_func, 0.4, drop=lambda i, k, tau: drop(i, k, tau))
    for k in base:
        assert torch.allclose(fused[k].float(), streaming[k].float(), rtol=1e-6, atol=1e-6), k
