"""The Triton backend against the reference: every Triton kernel on every dtype, odd and empty
shapes, N = 1…8 inputs, strided inputs and ``out=``. Without a GPU the kernels run on CPU tensors
under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from helpers import assert_close, inputs

import fusion_kernels as fk
from fusion_kernels import reference as ref

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (1031,), (33, 65), (0, 7)]


def _on_device(xs):
    return [x.to(DEVICE) for x in xs]


def _ops(xs, weights):
    """(name, our call, reference result) for each elementwise op, given the inputs."""
    fisher = [x.abs() + 0.5 for x in xs]
    fisher[0] = torch.zeros_like(fisher[0])  # one model without Fisher mass
    return [
        ("weighted_sum", lambda out=None: fk.weighted_sum(xs, weights, out=out), ref.weighted_sum(xs, weights)),
        (
            "task_arithmetic",
            lambda out=None: fk.task_arithmetic(xs[0], xs[1:] or xs, weights[1:] or weights, out=out),
            ref.task_arithmetic(xs[0], xs[1:] or xs, weights[1:] or weights),
        ),
        (
            "fisher_merge",
            lambda out=None: fk.fisher_merge(xs, fisher, weights, eps=1e-6, out=out),
            ref.fisher_merge(xs, fisher, weights, eps=1e-6),
        ),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", range(1, 9))
def test_elementwise_ops_match_reference(dtype, shape, n):
    xs = _on_device(inputs(n, shape, dtype, seed=n))
    weights = [0.3 + 0.2 * i for i in range(n)]
    with fk.use_backend("triton"):
        for name, call, expected in _ops(xs, weights):
            got = call()
            assert got.device == xs[0].device, name
            assert_close(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_out(dtype):
    xs = [x.t() for x in _on_device(inputs(3, (40, 24), dtype, seed=5))]  # (24, 40), not contiguous
    weights = [0.5, 1.25, 2.0]
    with fk.use_backend("triton"):
        for name, call, expected in _ops(xs, weights):
            out = torch.zeros(40, 24, dtype=dtype, device=DEVICE).t()
            assert call(out=out) is out, name
            assert_close(out, expected)


def test_bfloat16_rounds_to_nearest_even_like_tensor_to():
    # 1 + 3·2⁻⁸ lies halfway between two bfloat16 values: to nearest even it goes up, truncation
    # (the interpreter's own conversion) would go down. The others sit just beside such ties.
    a = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.bfloat16, device=DEVICE)
    b = torch.tensor([3 * 2**-8, -3 * 2**-8, 2**-8, 3 * 2**-8 + 2**-14], dtype=torch.bfloat16, device=DEVICE)
    with fk.use_backend("triton"):
        got = fk.weighted_sum([a, b], [1.0, 1.0])
    expected = (a.float() + b.float()).to(torch.bfloat16)
    assert torch.equal(got, expected), (got, expected)
    assert got[0].item() == 1.0 + 2**-6


def test_float64_and_unknown_ops_decline_with_reasons():
    x = torch.ones(4, dtype=torch.float64, device=DEVICE)
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="dtype torch.float64"):
        fk.weighted_sum([x, x])
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="does not implement"):
        fk.linear_assignment(torch.eye(3, device=DEVICE))
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="complex"):
        fk.permute(torch.ones(3, dtype=torch.complex64, device=DEVICE), {0: [2, 1, 0]})


def test_cpu_tensors_are_never_sent_to_triton_automatically():
    assert "triton" not in fk.available_backends("cpu")


SPARSIFY = [None, "magnitude", "random", "magnitude_outliers"]  # della: its own tests (the interpreter sorts slowly)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsify", SPARSIFY, ids=str)
@pytest.mark.parametrize("consensus", [None, "sum", "count"], ids=str)
@pytest.mark.parametrize("combine", ["sum", "mean_count", "mean_weight"])
def test_sparse_merge_matches_reference(dtype, sparsify, consensus, combine):
    from test_sparse_merge import reference

    base, *xs = _on_device(inputs(4, (33, 65), dtype, seed=len(str((sparsify, consensus, combine)))))
    w = [0.6, -0.3, 1.2]
    rescale = [None, "inverse_density", "l1"][(SPARSIFY.index(sparsify) + len(combine)) % 3]
    kw = dict(
        sparsify=sparsify,
        density=0.4,
        gamma=0.1,
        rescale=rescale,
        consensus=consensus,
        elect_on="unweighted" if consensus == "count" else "weighted",
        combine=combine,
        lam=0.9,
        seed=7,
    )
    for b in (base, None):
        with fk.use_backend("triton"):
            got = fk.sparse_merge(b, xs, w, **kw)
        assert_close(got, reference(b, xs, w, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", range(1, 9))
def test_ties_and_dare_for_1_to_8_models(dtype, n):
    from test_sparse_merge import reference

    base, *xs = _on_device(inputs(n + 1, (1031,), dtype, seed=n))
    w = [0.5 + 0.1 * i for i in range(n)]
    with fk.use_backend("triton"):
        ties = fk.ties_merge(base, xs, w, density=0.3)
        dare = fk.dare_merge(base, xs, w, density=0.3, seed=n, consensus="sum")
    assert_close(ties, reference(base, xs, w, density=0.3))
    expected = reference(base, xs, w, sparsify="random", density=0.3, seed=n, rescale="inverse_density", combine="sum")
    assert_close(dare, expected)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_dare_masks_are_the_counter_based_hash_bit_for_bit(seed):
    x = torch.randn(5000, device=DEVICE) + 3.0  # no zeros: every kept value shows
    with fk.use_backend("triton"):
        kept = fk.sparse_merge(
            None, [x], [1.0], sparsify="random", density=0.37, consensus=None, combine="sum", seed=seed
        )
    expected = ref.random_keep_mask(x.shape, 0.37, seed, 0, device=x.device)
    assert torch.equal(kept != 0, expected)
    assert torch.equal(kept[expected], x[expected])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitude_prune_and_threshold_with_ties_across_blocks(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-6, 7, (20_001,), generator=g) / 4).to(dtype).to(DEVICE)  # 13 values, 20 blocks
    for k in (0, 1, 1000, 10_000, 19_999, 20_001):
        with fk.use_backend("triton"):
            pruned = fk.magnitude_prune(x, k=k)
        assert torch.equal(pruned, ref.magnitude_prune(x, k)), k
        if k:
            with fk.use_backend("triton"):
                t = fk.magnitude_threshold(x, k=k)
            assert torch.equal(t, ref.magnitude_threshold(x, k)), k
    with fk.use_backend("triton"):
        assert fk.magnitude_prune(torch.empty(0, 3, dtype=dtype, device=DEVICE), 0.5).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (37,), (5, 1), (6, 21)], ids=str)
@pytest.mark.parametrize("tile", [4096, 32], ids=lambda t: f"tile{t}")
def test_della_masks_and_merge_match_the_reference(dtype, shape, tile, monkeypatch):
    from test_sparse_merge import reference

    from fusion_kernels.reference.sparse_merge import keep_mask_and_probability
    from fusion_kernels.triton.sparse_merge import della_masks

    monkeypatch.setattr("fusion_kernels.triton.sparse_merge.DELLA_TILE", tile)
    base, *xs = _on_device(inputs(4, shape, dtype, seed=sum(shape)))
    xs[1] = (xs[1] * 4).round() / 4  # ties, ranked by index
    for b in (base, None):
        masks = della_masks(b, xs, [0.3, 0.5, 0.7], [0.1, 0.2, 0.3], 11)
        for i, (x, d, e) in enumerate(zip(xs, [0.3, 0.5, 0.7], [0.1, 0.2, 0.3], strict=True)):
            tau = x.float() - b.float() if b is not None else x
            assert torch.equal(masks[i], keep_mask_and_probability(tau, i, "della", d, 0.0, e, 11)[0])
    for consensus, combine in [("sum", "mean_count"), (None, "sum"), ("count", "mean_weight")]:
        kw = dict(sparsify="della", density=0.4, epsilon=0.2, seed=3, consensus=consensus, combine=combine)
        with fk.use_backend("triton"):
            got = fk.sparse_merge(base, xs, [0.5, 1.0, 0.7], rescale="l1", **kw)
        assert_close(got, reference(base, xs, [0.5, 1.0, 0.7], rescale="l1", **kw))


def test_della_declines_what_triton_cannot_rank():
    x = torch.ones(2, 3, 4, device=DEVICE)
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="1-D and 2-D"):
        fk.della_merge(x, [x, x], density=0.5)
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="inverse_density"):
        fk.della_merge(x[0], [x[0], x[0]], density=0.5, rescale="inverse_density")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rowwise", [False, True])
def test_slerp_matches_reference(dtype, rowwise):
    a, b = _on_device(inputs(2, (37, 129), dtype, seed=9))
    t = [0.1 * (i % 10) for i in range(37)] if rowwise else 0.3
    with fk.use_backend("triton"):
        got = fk.slerp(a, b, t, rowwise=rowwise)
        parallel = fk.slerp(a, 2 * a, 0.25)
    assert_close(got, fk.slerp(a.cpu(), b.cpu(), t, rowwise=rowwise).to(DEVICE))
    assert_close(parallel, (0.75 * a.float() + 0.5 * a.float()).to(dtype))


PERMUTE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]


@pytest.mark.parametrize("dtype", PERMUTE_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((37, 53), (0, 1)),
        ((37, 53), (1,)),
        ((16, 8, 3, 3), (0, 1)),
        ((5, 7, 2, 3), (0, 2)),
        ((101,), (0,)),
        ((0, 5), (0,)),
    ],
)
def test_permute_equals_index_select_chain(dtype, shape, dims):
    from test_permute import _chain, _perm, _tensor

    x = _tensor(shape, dtype).to(DEVICE)
    perms = {d: _perm(shape[d], seed=d + 1) for d in dims}
    with fk.use_backend("triton"):
        got = fk.permute(x, perms)
        back = fk.permute(got, perms, inverse=True)
        many = fk.permute_many([x, x.flip(0)], [perms, perms])
    expected = _chain(x.cpu(), perms).to(DEVICE)
    assert torch.equal(got, expected) and torch.equal(back, x) and torch.equal(many[0], expected)
    assert torch.equal(many[1], _chain(x.flip(0).cpu(), perms).to(DEVICE))


@pytest.mark.parametrize("shape", [(1, 1), (3, 12, 17), (2, 2, 5, 300)])
def test_sinkhorn_matches_reference(shape):
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(shape, generator=g).to(DEVICE)
    with fk.use_backend("triton"):
        got = fk.sinkhorn(cost, reg=0.1, tol=1e-5, max_iter=60, check_every=5)
        log = fk.sinkhorn(cost, reg=1e-3, tol=None, max_iter=10, log=True)
    with fk.use_backend("torch"):
        expected = fk.sinkhorn(cost, reg=0.1, tol=1e-5, max_iter=60, check_every=5)
        expected_log = fk.sinkhorn(cost, reg=1e-3, tol=None, max_iter=10, log=True)
    torch.testing.assert_close(got.plan, expected.plan, rtol=1e-4, atol=1e-7)
    assert torch.equal(got.iterations, expected.iterations)
    torch.testing.assert_close(log.plan, expected_log.plan, rtol=1e-4, atol=1e-3)
    assert bool(torch.isfinite(log.plan).all())
    with fk.use_backend("triton"), pytest.raises(fk.BackendError, match="float64"):
        fk.sinkhorn(cost.double(), reg=0.1)


def test_permute_many_groups_a_mixed_state_dict():
    from test_permute import _chain, _perm, _tensor

    p = _perm(64, 1)
    state = {
        "w": _tensor((64, 32), torch.float32).to(DEVICE),
        "b": _tensor((64,), torch.bfloat16).to(DEVICE),
        "count": torch.arange(64, device=DEVICE),
        "mask": (_tensor((10, 64), torch.float32) > 0).to(DEVICE),
        "empty": torch.empty(0, 64, device=DEVICE),
    }
    specs = {"w": {0: p}, "b": {0: p}, "count": {0: p}, "mask": {1: p}, "empty": {1: p}}
    with fk.use_backend("triton"):
        got = fk.permute_many(state, specs)
    for name, x in state.items():
        assert torch.equal(got[name], _chain(x.cpu(), specs[name]).to(DEVICE)), name
