"""sinkhorn: backends against the reference, marginals, batching, POT, the low-temperature limit,
gradients (implicit and unrolled, gradcheck in float64) and bad input."""

import importlib.util
import math

import pytest
import torch
from helpers import assert_peer_close, device, randn, skip_if_interpreted

import fusion_kernels as fk
from fusion_kernels import reference as ref

HAVE_POT = importlib.util.find_spec("ot") is not None


def _cost(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(device())


def _masses(n, seed, total=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return (w * (total / w.sum())).to(device())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 40, 57), (2, 2, 17, 9), (130, 260)])
def test_backend_matches_reference_and_marginals_hold(backend, dtype, shape):
    if math.prod(shape) > 1000:
        skip_if_interpreted(backend, "hundreds of iterations on a large plan")
    cost = _cost(shape, seed=1, dtype=dtype)
    n, m = shape[-2:]
    got = fk.sinkhorn(cost, reg=0.1, tol=1e-5, max_iter=2000)
    with fk.use_backend("torch"):
        expected = fk.sinkhorn(cost, reg=0.1, tol=1e-5, max_iter=2000)
    assert got.plan.shape == shape and got.plan.dtype == dtype
    assert got.f.shape == (*shape[:-1],) and got.g.shape == (*shape[:-2], m)
    assert got.iterations.shape == shape[:-2] and got.error.dtype == torch.float64
    assert_peer_close(got.plan, expected.plan, "sinkhorn_at_tol")
    assert bool((got.error <= 1e-5).all())
    row_error = (got.plan.double().sum(-1) - 1 / n).abs().sum(-1)
    assert_peer_close(row_error, got.error, "sinkhorn_reported_error")
    torch.testing.assert_close(got.plan.double().sum(-2), torch.full(got.g.shape, 1 / m, dtype=torch.float64))
    p = torch.exp((got.f.unsqueeze(-1) + got.g.unsqueeze(-2) - cost) / 0.1)
    assert_peer_close(p, got.plan, "sinkhorn_at_tol")


def test_batched_equals_looped_and_each_matrix_stops_on_its_own(backend):
    skip_if_interpreted(backend, "up to 5000 iterations")
    cost = torch.stack([_cost((30, 20), seed=2), 5 * _cost((30, 20), seed=3), _cost((30, 20), seed=4)])
    a, b = _masses(30, 5, total=2.0), _masses(20, 6, total=2.0)
    batched = fk.sinkhorn(cost, a, b, reg=0.05, tol=1e-6, max_iter=5000, check_every=7)
    for i in range(3):
        one = fk.sinkhorn(cost[i], a, b, reg=0.05, tol=1e-6, max_iter=5000, check_every=7)
        assert torch.equal(one.plan, batched.plan[i]) and one.iterations == batched.iterations[i]
    assert batched.iterations.unique().numel() > 1
    assert all(int(k) % 7 == 0 for k in batched.iterations)


def test_tol_none_runs_exactly_max_iter_and_log_plan(backend):
    skip_if_interpreted(backend, "74 launches of the log-domain loop")
    cost = _cost((4, 25, 25), seed=7)
    r = fk.sinkhorn(cost, reg=0.2, tol=None, max_iter=37)
    assert r.iterations.tolist() == [37] * 4
    log = fk.sinkhorn(cost, reg=0.2, tol=None, max_iter=37, log=True)
    torch.testing.assert_close(log.plan.exp(), r.plan)


def test_small_reg_is_stable(backend):
    skip_if_interpreted(backend, "up to 3000 iterations")
    cost = _cost((2, 64, 64), seed=8)  # costs of order 1 against reg = 1e-3: exp(-1000) underflows
    r = fk.sinkhorn(cost, reg=1e-3, tol=1e-4, max_iter=3000)
    assert bool(torch.isfinite(r.plan).all() and torch.isfinite(r.f).all() and torch.isfinite(r.g).all())
    assert_peer_close(r.plan.sum(-2), torch.full((2, 64), 1 / 64), "sinkhorn_at_tol")
    assert bool(torch.isfinite(fk.sinkhorn(cost, reg=1e-3, max_iter=50, log=True).plan).all())


def test_half_precision_costs_return_their_dtype(backend):
    for dtype in (torch.float16, torch.bfloat16):
        cost = _cost((10, 12), seed=9, dtype=dtype)
        r = fk.sinkhorn(cost, reg=0.1)
        expected = fk.sinkhorn(cost.float(), reg=0.1)
        assert r.plan.dtype == dtype and r.f.dtype == dtype
        torch.testing.assert_close(r.plan, expected.plan.to(dtype))


def test_low_temperature_recovers_the_assignment(backend):
    skip_if_interpreted(backend, "reg=0.01 converges in thousands of iterations")
    n = 40
    g = torch.Generator().manual_seed(10)
    perm = torch.randperm(n, generator=g)
    cost = 1 + 0.3 * torch.rand(n, n, generator=g)
    cost[torch.arange(n), perm] = 0.2 * torch.rand(n, generator=g)  # well separated optimum
    r = fk.sinkhorn(cost, reg=0.01, tol=1e-6)
    assert torch.equal(r.plan.argmax(-1), perm)
    assert torch.equal(r.plan.argmax(-1), fk.linear_assignment(cost))
    doubly = fk.sinkhorn(cost, torch.ones(n), torch.ones(n), reg=0.01)  # the Sinkhorn operator
    assert_peer_close(doubly.plan.sum(-1), torch.ones(n), "sinkhorn_marginals")


@pytest.mark.skipif(not HAVE_POT, reason="POT is not installed")
def test_matches_pot_sinkhorn_log(backend):
    import ot

    cost = _cost((25, 31), seed=11, dtype=torch.float64)
    a, b = _masses(25, 12), _masses(31, 13)
    ours = fk.sinkhorn(cost, a, b, reg=0.05, tol=1e-12, max_iter=10000)
    theirs = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), cost.numpy(), 0.05, numItermax=10000, stopThr=1e-14)
    assert_peer_close(ours.plan, torch.from_numpy(theirs), "pot_float64")
    theirs32 = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 0.05, method="sinkhorn_log", stopThr=1e-14)
    ours32 = fk.sinkhorn(cost.float(), a.float(), b.float(), reg=0.05, tol=1e-6, max_iter=10000)
    assert_peer_close(ours32.plan.double(), torch.from_numpy(theirs32), "pot_vs_float32")


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_gradcheck_float64(backend, mode):
    cost = _cost((2, 4, 5), seed=14, dtype=torch.float64).requires_grad_(True)
    a, b = _masses(4, 15), _masses(5, 16)
    weights = randn((4, 5), torch.float64, seed=17)
    run = dict(reg=0.3, tol=1e-13, max_iter=20000, backward=mode)
    assert torch.autograd.gradcheck(lambda c: fk.sinkhorn(c, a, b, **run).plan, (cost,))
    assert torch.autograd.gradcheck(lambda c: (fk.sinkhorn(c, a, b, log=True, **run).plan * weights).sum(), (cost,))
    dual = lambda c: (lambda r: (r.f * a).sum() + (r.g * b).sum())(fk.sinkhorn(c, a, b, **run))  # noqa: E731
    assert torch.autograd.gradcheck(dual, (cost,))
    tall = _cost((6, 3), seed=18, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: fk.sinkhorn(c, **run).plan, (tall,))


def test_implicit_and_unrolled_gradients_agree_at_convergence():
    cost = _cost((12, 9), seed=19, dtype=torch.float64)
    target = randn((12, 9), torch.float64, seed=20)
    grads = []
    for mode in ("implicit", "unrolled"):
        c = cost.clone().requires_grad_(True)
        ((fk.sinkhorn(c, reg=0.1, tol=1e-12, max_iter=5000, backward=mode).plan - target) ** 2).sum().backward()
        grads.append(c.grad)
    assert_peer_close(grads[0], grads[1], "gradients_two_ways")


def test_reference_is_the_plain_loop_at_tol_none():
    cost = _cost((1, 6, 7), seed=21, dtype=torch.float64)
    log_a, log_b = torch.full((1, 6), 1 / 6).double().log(), torch.full((1, 7), 1 / 7).double().log()
    f, g = torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1, 7, dtype=torch.float64)
    for _ in range(25):
        f = 0.5 * (log_a - torch.logsumexp((g.unsqueeze(1) - cost) / 0.5, 2))
        g = 0.5 * (log_b - torch.logsumexp((f.unsqueeze(2) - cost) / 0.5, 1))
    plan, f_ref, g_ref, iterations, _ = ref.sinkhorn(cost, log_a, log_b, 0.5, 25, -1.0, 10, False)
    assert iterations.item() == 25
    torch.testing.assert_close(f_ref, f)
    torch.testing.assert_close(g_ref, g)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reg": -0.1}, fk.WeightError, "reg > 0"),
        ({"reg": 0.0}, fk.WeightError, "reg > 0"),
        ({"reg": float("nan")}, fk.WeightError, "finite"),
        ({"reg": 0.1, "tol": -1e-3}, fk.WeightError, "tol >= 0"),
        ({"reg": 0.1, "max_iter": 0}, fk.ArgumentTypeError, "max_iter"),
        ({"reg": 0.1, "check_every": 1.5}, fk.ArgumentTypeError, "check_every"),
        ({"reg": 0.1, "backward": "magic"}, fk.ArgumentTypeError, "backward"),
        ({"reg": 0.1, "a": torch.ones(4) / 4}, fk.ShapeError, r"'a' expected shape \[..., 3\]"),
        ({"reg": 0.1, "a": torch.tensor([0.5, 0.5, 0.0])}, fk.WeightError, "strictly positive"),
        ({"reg": 0.1, "b": torch.full((5,), 0.5)}, fk.WeightError, "equal total mass"),
        ({"reg": 0.1, "a": torch.ones(7, 3) / 3}, fk.ShapeError, "does not broadcast"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fk.sinkhorn(torch.rand(2, 3, 5), **kwargs)


def test_bad_costs():
    with pytest.raises(fk.ShapeError, match=r"\[..., n, m\]"):
        fk.sinkhorn(torch.rand(5), reg=0.1)
    with pytest.raises(fk.ShapeError, match="n, m >= 1"):
        fk.sinkhorn(torch.rand(0, 5), reg=0.1)
    with pytest.raises(fk.WeightError, match="NaN or infinite"):
        fk.sinkhorn(torch.tensor([[0.0, float("inf")]]), reg=0.1)
    with pytest.raises(fk.DTypeError):
        fk.sinkhorn(torch.ones(2, 2, dtype=torch.int64), reg=0.1)


@pytest.mark.parametrize("scale, reg", [(1e9, 1.0), (1e7, 1e-3), (1e5, 1.0)], ids=["1e9", "1e10", "1e5"])
def test_a_huge_cost_over_reg_never_reports_a_wrong_plan_as_converged(scale, reg):
    """float32 cannot hold exp((f + g − C)/reg) at these spreads: the op works in float64 or refuses;
    either way a reported error <= tol means the returned plan meets its marginals."""
    n = 64
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) * scale
    try:
        result = fk.sinkhorn(cost, reg=reg, max_iter=2000)
    except fk.WeightError as e:
        assert "max|cost| / reg <= 2^36" in str(e)
        return
    true_error = (result.plan.double().sum(1) - 1 / n).abs().sum()
    assert bool(torch.isfinite(result.plan).all())
    if float(result.error) <= 1e-6:
        assert float(true_error) <= 1e-4, (float(result.error), float(true_error))


def test_a_cost_beyond_float64_is_refused_by_name():
    with pytest.raises(fk.WeightError, match=r"argument 'cost' expected max\|cost\| / reg <= 2\^36"):
        fk.sinkhorn(torch.rand(3, 3) * 3e38, reg=1.0)


def test_opcheck():
    cost = torch.rand(2, 5, 6, dtype=torch.float64)
    log_a = torch.full((2, 5), -math.log(5), dtype=torch.float64)
    log_b = torch.full((2, 6), -math.log(6), dtype=torch.float64)
    torch.library.opcheck(torch.ops.fusion_kernels.sinkhorn.default, (cost, log_a, log_b, 0.5, 200, 1e-9, 10, False))


def test_the_loop_reads_the_device_only_at_its_checks(monkeypatch):
    """The shared loop (the torch and Triton backends) syncs with the device once per check, not per
    iteration: on a GPU a sync per iteration costs more than the iteration."""
    loop = importlib.import_module("fusion_kernels.reference.sinkhorn")
    reads = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or original(self))
    cost = torch.rand(2, 6, 7, dtype=torch.float64)
    log_a = torch.full((2, 6), -math.log(6), dtype=torch.float64)
    log_b = torch.full((2, 7), -math.log(7), dtype=torch.float64)
    _, _, iterations, _ = loop.iterate(
        cost,
        log_a,
        log_b,
        0.5,
        100,
        -1.0,  # never met: every check runs
        10,
        lambda c, g: torch.logsumexp((g.unsqueeze(1) - c) / 0.5, dim=2),
        lambda c, f: torch.logsumexp((f.unsqueeze(2) - c) / 0.5, dim=1),
    )
    assert iterations.tolist() == [100, 100] and len(reads) == 10  # one read at each of the 10 checks
