"""linear_assignment: optimal cost equal to SciPy's on random and degenerate matrices, valid
assignments, batches, warm starts, potentials that certify optimality, and bad input."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import fusion_kernels as fk


def _scipy_total(cost: torch.Tensor, maximize=False) -> float:
    _, cols = linear_sum_assignment(cost.double().numpy(), maximize=maximize)
    return _total(cost, torch.from_numpy(cols))


def _total(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost.double()[torch.arange(cost.shape[0]), perm].sum())


def _matrices():
    g = torch.Generator().manual_seed(0)
    yield "randn", torch.randn(60, 60, generator=g, dtype=torch.float64)
    yield "rectangular", torch.randn(23, 41, generator=g, dtype=torch.float64)
    yield "integer ties", torch.randint(0, 3, (50, 50), generator=g).double()
    yield "all equal", torch.ones(17, 17, dtype=torch.float64)
    yield "rank one", torch.outer(torch.arange(30.0), torch.arange(30.0)).double()
    yield "huge range", (torch.randn(25, 25, generator=g) * 1e12).double()
    yield "one", torch.tensor([[3.5]], dtype=torch.float64)
    yield "float32", torch.randn(33, 33, generator=g)


@pytest.mark.parametrize(("name", "cost"), list(_matrices()), ids=[n for n, _ in _matrices()])
@pytest.mark.parametrize("maximize", [False, True])
def test_optimal_cost_equals_scipy(backend, name, cost, maximize):
    perm = fk.linear_assignment(cost, maximize)
    assert perm.dtype == torch.int64 and perm.shape == cost.shape[:1]
    assert perm.unique().numel() == cost.shape[0] and int(perm.min()) >= 0 and int(perm.max()) < cost.shape[1]
    assert _total(cost, perm) == _scipy_total(cost, maximize)


def test_many_small_random_matrices(backend):
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(1, 10))
        m = n if trial % 2 else int(rng.integers(n, 13))
        c = rng.integers(-2, 3, (n, m)).astype(np.float64) if trial % 3 == 0 else rng.standard_normal((n, m))
        cost = torch.from_numpy(c)
        assert _total(cost, fk.linear_assignment(cost)) == _scipy_total(cost), c


def _wide_matrices():
    """Rows of 4,096 columns and more: the cpu backend splits each row scan over its threads."""
    g = torch.Generator().manual_seed(5)
    yield "rectangular", torch.randn(300, 4103, generator=g, dtype=torch.float64)
    yield "integer ties", torch.randint(0, 4, (400, 4099), generator=g).double()  # ties across the ranges
    yield "float32 square", torch.randn(4096, 4096, generator=g)
    yield "bfloat16", torch.randn(200, 4500, generator=g).bfloat16()


@pytest.mark.parametrize(("name", "cost"), list(_wide_matrices()), ids=[n for n, _ in _wide_matrices()])
@pytest.mark.parametrize("maximize", [False, True])
def test_wide_rows_over_threads_equal_one_thread_and_scipy(backend, name, cost, maximize):
    if backend != "cpu":
        pytest.skip("the split of the row scans is the cpu backend's")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fk.linear_assignment(cost, maximize)
        torch.set_num_threads(2)
        split = fk.linear_assignment(cost, maximize)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, alone)  # the ranges merge in index order: the same ties, the same answer
    assert split.unique().numel() == cost.shape[0]
    assert _total(cost, split) == _scipy_total(cost.float() if cost.dtype == torch.bfloat16 else cost, maximize)


def test_wide_warm_start_over_threads_equals_one_thread_and_scipy(backend):
    if backend != "cpu":
        pytest.skip("warm starts and the split of the row scans are the cpu backend's")
    g = torch.Generator().manual_seed(7)
    cost = torch.randn(4096, 4096, generator=g)
    _, v = fk.linear_assignment(cost, return_potentials=True)
    nudged = cost + 0.05 * torch.randn(cost.shape, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fk.linear_assignment(nudged, warm_start=v)
        torch.set_num_threads(2)
        split = fk.linear_assignment(nudged, warm_start=v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, alone)
    assert _total(nudged, split) == _scipy_total(nudged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_costs_solve_as_their_float64_values(backend, dtype):
    """float32/16 costs are read as float32 and widened in the solver: the float64 arithmetic of
    the same values, so the same assignment and potentials as the float64 copy."""
    g = torch.Generator().manual_seed(6)
    cost = torch.randint(-3, 4, (37, 45), generator=g).to(dtype) * 0.5 + torch.randn(37, 45, generator=g).to(dtype)
    for maximize in (False, True):
        assert torch.equal(fk.linear_assignment(cost, maximize), fk.linear_assignment(cost.double(), maximize))
    if backend == "cpu":
        square = cost[:, :37]
        perm, v = fk.linear_assignment(square, return_potentials=True)
        perm64, v64 = fk.linear_assignment(square.double(), return_potentials=True)
        assert torch.equal(perm, perm64) and torch.equal(v, v64)


def test_batch_equals_loop_and_empty(backend):
    g = torch.Generator().manual_seed(2)
    cost = torch.randn(2, 3, 20, 20, generator=g)
    batched = fk.linear_assignment(cost)
    assert batched.shape == (2, 3, 20)
    for i in range(2):
        for j in range(3):
            assert _total(cost[i, j], batched[i, j]) == _scipy_total(cost[i, j])
    assert fk.linear_assignment(torch.zeros(0, 4, 4)).shape == (0, 4)
    assert fk.linear_assignment(torch.zeros(3, 0, 2)).shape == (3, 0)


def test_potentials_certify_optimality_and_warm_start():
    g = torch.Generator().manual_seed(3)
    cost = torch.randn(4, 80, 80, generator=g, dtype=torch.float64)
    perm, v = fk.linear_assignment(cost, return_potentials=True)
    u = (cost - v.unsqueeze(-2)).amin(-1)  # the row potentials these column potentials imply
    reduced = cost - u.unsqueeze(-1) - v.unsqueeze(-2)
    assert float(reduced.min()) >= -1e-9
    assert float(reduced.gather(-1, perm.unsqueeze(-1)).abs().max()) <= 1e-9  # tight on the assignment
    nudged = cost + 0.05 * torch.randn(4, 80, 80, generator=g, dtype=torch.float64)
    warm, v2 = fk.linear_assignment(nudged, warm_start=v, return_potentials=True)
    for b in range(4):
        assert _total(nudged[b], warm[b]) == pytest.approx(_scipy_total(nudged[b]), abs=1e-9)
    sim = -cost[0]
    p_max, v_max = fk.linear_assignment(sim, maximize=True, return_potentials=True)
    again = fk.linear_assignment(sim + 0.01, maximize=True, warm_start=v_max)
    assert _total(sim, again) == pytest.approx(_scipy_total(sim, maximize=True), abs=1e-9)


def test_torch_backend_has_no_potentials():
    with fk.use_backend("torch"), pytest.raises(fk.BackendError, match="no potentials"):
        fk.linear_assignment(torch.randn(3, 3), return_potentials=True)


def test_bad_input():
    with pytest.raises(fk.ShapeError, match="n <= m"):
        fk.linear_assignment(torch.randn(5, 4))
    with pytest.raises(fk.ShapeError, match=r"\[..., n, m\]"):
        fk.linear_assignment(torch.randn(5))
    with pytest.raises(fk.WeightError, match="NaN"):
        fk.linear_assignment(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(fk.DTypeError):
        fk.linear_assignment(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(fk.ShapeError, match="warm_start' expected shape"):
        fk.linear_assignment(torch.randn(3, 3), warm_start=torch.zeros(4))
    with pytest.raises(fk.ShapeError, match="square"):
        fk.linear_assignment(torch.randn(3, 4), warm_start=torch.zeros(4))


@pytest.mark.parametrize("potentials", [False, True])
def test_opcheck(potentials):
    cost = torch.rand(2, 6, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fusion_kernels.linear_assignment.default, (cost, True, potentials, None))
    if potentials:
        warm = torch.zeros(2, 8, dtype=torch.float64)
        with fk.use_backend("cpu"):
            args = (cost[:, :, :6].contiguous(), False, True, warm[:, :6].contiguous())
            torch.library.opcheck(torch.ops.fusion_kernels.linear_assignment.default, args)
