"""The CUDA C++ backend (fusion_kernels._C_cuda) against the reference, on a GPU; elsewhere, that it
declines with its reason. Build it with FUSION_KERNELS_CUDA=1 (see setup.py)."""

import pytest
import torch
from helpers import assert_close, inputs

import fusion_kernels as fk
from fusion_kernels import _cuda_native
from fusion_kernels import reference as ref

REASON = _cuda_native.unavailable_reason()
needs_cuda = pytest.mark.skipif(REASON is not None, reason=f"cuda backend unavailable: {REASON}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_unavailable_backend_declines_with_its_reason():
    if REASON is None:
        pytest.skip("the cuda backend is available here")
    x = torch.ones(3)
    with fk.use_backend("cuda"), pytest.raises(fk.BackendError, match="backend 'cuda'"):
        fk.weighted_sum([x, x])
    assert "cuda" not in fk.available_backends("cuda") or torch.cuda.is_available()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (1031,), (33, 65), (0, 7)], ids=str)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_averaging_matches_reference(dtype, shape, n):
    xs = [x.cuda() for x in inputs(n, shape, dtype, seed=n)]
    fisher = [x.abs() + 0.5 for x in xs]
    w = [0.3 + 0.2 * i for i in range(n)]
    with fk.use_backend("cuda"):
        assert_close(fk.weighted_sum(xs, w), ref.weighted_sum(xs, w))
        assert_close(fk.task_arithmetic(xs[0], xs, w), ref.task_arithmetic(xs[0], xs, w))
        assert_close(fk.fisher_merge(xs, fisher, w, eps=1e-6), ref.fisher_merge(xs, fisher, w, eps=1e-6))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_permute_many_matches_index_select(dtype):
    from test_permute import _chain, _perm, _tensor

    shapes = [((37, 53), (0, 1)), ((16, 8, 3, 3), (0, 1)), ((101,), (0,)), ((5, 7, 2, 3), (0, 2))]
    xs = [_tensor(s, dtype).cuda() for s, _ in shapes]
    specs = [{d: _perm(s[d], d + 1) for d in dims} for s, dims in shapes]
    with fk.use_backend("cuda"):
        got = fk.permute_many(xs, specs)
    for x, spec, y in zip(xs, specs, got, strict=True):
        assert torch.equal(y, _chain(x.cpu(), spec).cuda())
