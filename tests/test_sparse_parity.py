"""Parity with the real libraries: PEFT 0.21.2 ``merge_utils`` and mergekit 0.1.5's generalized
task arithmetic, on float32 inputs with distinct magnitudes. Random methods get the library's own
masks (replayed from the same torch seed)."""

import pytest
import torch
from helpers import assert_close, inputs
from peers import mergekit_gta, peft_merge_utils

import fusion_kernels as fk

SHAPE = (37, 53)
N = 3


def tasks(n=N, seed=0):
    return inputs(n, SHAPE, torch.float32, seed=seed)


def bernoulli_masks(deltas, density, seed):
    """The masks torch.bernoulli drew inside the library, replayed in the same order."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full_like(d, density)).bool() for d in deltas]


# PEFT ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, consensus", [("total", "sum"), ("frequency", "count")])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_peft_ties(backend, method, consensus, density):
    peft = peft_merge_utils()
    ts, w = tasks(), [0.7, 1.3, -0.4]
    expected = peft.ties(ts, torch.tensor(w), density, majority_sign_method=method)
    got = fk.ties_merge(None, ts, w, density=density, consensus=consensus, elect_on="unweighted", combine="mean_count")
    assert_close(got, expected)


def test_peft_magnitude_prune_and_task_arithmetic(backend):
    peft = peft_merge_utils()
    ts, w = tasks(), [0.5, 0.25, 2.0]
    expected = peft.magnitude_prune(ts, torch.tensor(w), 0.3)
    got = fk.sparse_merge(None, ts, w, sparsify="magnitude", density=0.3, consensus=None, combine="sum")
    assert_close(got, expected)
    assert_close(fk.weighted_sum(ts, w), peft.task_arithmetic(ts, torch.tensor(w)))


@pytest.mark.parametrize("consensus", [None, "sum"])
def test_peft_dare_with_its_own_masks(backend, consensus):
    peft = peft_merge_utils()
    ts, w, density = tasks(), [0.6, 0.9, 1.1], 0.4
    torch.manual_seed(11)
    expected = (
        peft.dare_ties(ts, torch.tensor(w), density) if consensus else peft.dare_linear(ts, torch.tensor(w), density)
    )
    masks = bernoulli_masks(ts, density, 11)
    got = fk.dare_merge(
        None,
        ts,
        w,
        density=density,
        consensus=consensus,
        elect_on="unweighted",
        combine="mean_count" if consensus else "sum",
        masks=masks,
    )
    assert_close(got, expected)


def test_peft_prune_magnitude_tie_free_mask_matches(backend):
    peft = peft_merge_utils()
    (t,) = tasks(1)
    assert torch.equal(fk.magnitude_prune(t, 0.25), peft.prune(t, 0.25, method="magnitude"))


# mergekit ------------------------------------------------------------------------------------------
def mergekit_merge(method_name, base, xs, weights, density, rescale, normalize, lam=1.0, gamma=None):
    gta, TensorGroup, Sparsification = mergekit_gta()
    presets = {
        "ties": ("sum", Sparsification.magnitude),
        "dare_ties": ("sum", Sparsification.random),
        "dare_linear": (None, Sparsification.random),
        "breadcrumbs": (None, Sparsification.magnitude_outliers),
        "breadcrumbs_ties": ("sum", Sparsification.magnitude_outliers),
        "task_arithmetic": (None, None),
    }
    consensus, sparsification = presets[method_name]
    method = gta.GeneralizedTaskArithmeticMerge(
        consensus_method=gta.ConsensusMethod(consensus) if consensus else None,
        sparsification_method=sparsification,
        default_normalize=normalize,
        default_rescale=rescale,
        method_name=method_name,
        method_pretty_name=None,
        method_reference_url=None,
    )
    group = TensorGroup.from_tensors([base, *xs], base_index=0)
    params = {
        "int8_mask": False,
        "normalize": normalize,
        "rescale": rescale,
        "lambda": lam,
        "weight": {i + 1: w for i, w in enumerate(weights)},
        "density": {i + 1: density for i in range(len(xs))},
    }
    if gamma is not None:
        params["gamma"] = {i + 1: gamma for i in range(len(xs))}
    return method.merge_group(group, **params)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [0.25, 0.6])
def test_mergekit_ties(backend, normalize, density):
    base, *xs = tasks(N + 1, seed=5)
    w = [0.5, 1.0, -0.3]
    expected = mergekit_merge("ties", base, xs, w, density, rescale=False, normalize=normalize, lam=0.8)
    got = fk.ties_merge(base, xs, w, density=density, combine="mean_weight" if normalize else "sum", lam=0.8)
    assert_close(got, expected)


@pytest.mark.parametrize("method, consensus", [("dare_ties", "sum"), ("dare_linear", None)])
@pytest.mark.parametrize("rescale", [True, False])
def test_mergekit_dare_with_its_own_masks(backend, method, consensus, rescale):
    base, *xs = tasks(N + 1, seed=9)
    w, density = [0.8, 0.4, 1.2], 0.35
    torch.manual_seed(3)
    expected = mergekit_merge(method, base, xs, w, density, rescale=rescale, normalize=False)
    masks = bernoulli_masks([x - base for x in xs], density, 3)
    got = fk.dare_merge(
        base, xs, w, density=density, consensus=consensus, rescale="l1" if rescale else None, masks=masks
    )
    assert_close(got, expected)


@pytest.mark.parametrize("method, consensus", [("breadcrumbs", None), ("breadcrumbs_ties", "sum")])
@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0)])
def test_mergekit_breadcrumbs(backend, method, consensus, density, gamma):
    base, *xs = tasks(N + 1, seed=2)
    w = [1.0, 0.5, 0.25]
    expected = mergekit_merge(method, base, xs, w, density, rescale=False, normalize=False, gamma=gamma)
    got = fk.breadcrumbs_merge(base, xs, w, density=density, gamma=gamma, consensus=consensus)
    assert_close(got, expected)


def test_mergekit_task_arithmetic(backend):
    base, *xs = tasks(N + 1, seed=4)
    w = [0.3, 0.3, 0.4]
    expected = mergekit_merge("task_arithmetic", base, xs, w, 1.0, rescale=False, normalize=False)
    assert_close(fk.task_arithmetic(base, xs, w), expected)


# fusion_kernels.compat.peft: PEFT's own signatures, dtypes and random streams -----------------------
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_compat_peft_is_a_drop_in(name, dtype, density):
    from fusion_kernels.compat import peft as ours

    peft = peft_merge_utils()
    ts = [t.to(dtype) for t in tasks()]
    weights = torch.tensor([0.7, 1.3, 0.4])  # float32: PEFT promotes bf16 tasks to float32
    args = (ts, weights) if name == "task_arithmetic" else (ts, weights, density)
    torch.manual_seed(21)
    expected = getattr(peft, name)(*args)
    torch.manual_seed(21)
    got = getattr(ours, name)(*args)
    assert got.dtype == expected.dtype == torch.float32
    # bf16 values: PEFT trims bf16 tensors, where equal magnitudes are common and topk breaks ties
    # arbitrarily, and rescales DARE in bf16 before promoting; so only the promoted dtype is
    # compared there, except for the tie-free task_arithmetic.
    if dtype == torch.float32 or name == "task_arithmetic":
        assert_close(got, expected)


@pytest.mark.filterwarnings("ignore:The density")
def test_compat_peft_prune_rules():
    from fusion_kernels.compat import peft as ours

    peft = peft_merge_utils()
    (t,) = tasks(1)
    assert ours.prune(t, 1.5, "magnitude") is t
    with pytest.raises(ValueError, match="Density should be >= 0"):
        ours.prune(t, -0.1, "magnitude")
    assert torch.equal(ours.prune(t, 0.4, "magnitude"), peft.prune(t, 0.4, "magnitude"))
    torch.manual_seed(3)
    expected = peft.prune(t, 0.4, "random", rescale=True)
    torch.manual_seed(3)
    assert_close(ours.prune(t, 0.4, "random", rescale=True), expected)
    stacked = torch.stack(tasks())
    for method in ("total", "frequency"):
        mask = ours.calculate_majority_sign_mask(stacked, method)
        assert torch.equal(mask, peft.calculate_majority_sign_mask(stacked, method))
        assert_close(ours.disjoint_merge(stacked, mask), peft.disjoint_merge(stacked, mask))
