"""permute / permute_many: exact equality with index_select chains on every dtype and shape,
inverses and composition, state dicts, autograd, and bad input."""

import pytest
import torch
from helpers import device, skip_if_interpreted

import fusion_kernels as fk
from fusion_kernels import reference as ref

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def _tensor(shape, dtype, seed=0):
    """A test tensor on the running backend's device."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(device())
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.complex64:
        return torch.complex(x, -x).to(dtype)
    return x.to(dtype)


def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _chain(x, perms):
    for d, p in perms.items():
        x = x.index_select(d, torch.as_tensor(p, device=x.device))
    return x


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((37, 53), (0, 1)),  # a weight matrix: rows and columns
        ((37, 53), (1,)),
        ((16, 8, 3, 3), (0, 1)),  # a conv weight (out, in, kh, kw)
        ((5, 7, 2, 3), (0, 2, 3)),
        ((101,), (0,)),  # a bias
        ((1, 1), (0, 1)),
        ((0, 5), (0, 1)),  # empty
        ((4, 0, 3), (0, 2)),
    ],
)
def test_equals_index_select_chain(backend, dtype, shape, dims):
    x = _tensor(shape, dtype)
    perms = {d: _perm(shape[d], seed=d + 1) for d in dims}
    if backend == "triton" and dtype.is_complex:
        with pytest.raises(fk.BackendError, match="complex"):
            fk.permute(x, perms)
        return
    got = fk.permute(x, perms)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, _chain(x, perms))
    assert torch.equal(fk.permute(got, perms, inverse=True), x)


def test_large_tensor_spans_many_chunks_and_threads(backend):
    skip_if_interpreted(backend, "the cpu backend's chunking, 500K elements")
    # 2 MiB of output per tensor: several 256 KiB chunks, shared among threads, rows split mid-way.
    x = _tensor((513, 1021), torch.float32, seed=3)
    p0, p1 = _perm(513, 1), _perm(1021, 2)
    for perms in ({0: p0, 1: p1}, {0: p0}, {1: p1}):
        assert torch.equal(fk.permute(x, perms), _chain(x, perms))
    wide = _tensor((3, 300_001), torch.bfloat16, seed=4)
    q = _perm(300_001, 5)
    assert torch.equal(fk.permute(wide, {1: q}), wide[:, q])


def test_composition_and_inverse(backend):
    x = _tensor((20, 30), torch.float32)
    p, q = _perm(20, 1), _perm(20, 2)
    assert torch.equal(fk.permute(fk.permute(x, {0: p}), {0: q}), fk.permute(x, {0: p[q]}))
    assert torch.equal(fk.permute(x, {0: p}, inverse=True), fk.permute(x, {0: ref.inverse_permutation(p)}))
    assert torch.equal(ref.inverse_permutation(p)[p], torch.arange(20))


def test_non_contiguous_input_and_out(backend):
    base = _tensor((40, 30), torch.float16)
    x = base.t()  # (30, 40), strided
    perms = {0: _perm(30, 1), -1: _perm(40, 2).tolist()}  # a negative dim and a plain list
    expected = _chain(x, {0: perms[0], 1: perms[-1]})
    assert torch.equal(fk.permute(x, perms), expected)
    out = torch.zeros(40, 30, dtype=torch.float16).t()
    assert fk.permute(x, perms, out=out) is out
    assert torch.equal(out, expected)
    assert torch.equal(base, _tensor((40, 30), torch.float16))  # the input is untouched


def test_int32_permutations_and_identity(backend):
    x = _tensor((6, 4), torch.int64)
    p = _perm(6, 1).to(torch.int32)
    assert torch.equal(fk.permute(x, {0: p}), x[p.long()])
    same = fk.permute(x, {})
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_permute_many_list_and_state_dict(backend):
    p_hidden, p_out = _perm(64, 1), _perm(10, 2)
    state = {
        "fc1.weight": _tensor((64, 32), torch.float32, 1),
        "fc1.bias": _tensor((64,), torch.float32, 2),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": _tensor((64,), torch.float32, 3),
        "fc2.weight": _tensor((10, 64), torch.bfloat16, 4),
        "fc2.bias": _tensor((10,), torch.bfloat16, 5),
    }
    specs = {
        "fc1.weight": {0: p_hidden},
        "fc1.bias": {0: p_hidden},
        "bn.running_mean": {0: p_hidden},
        "fc2.weight": {0: p_out, 1: p_hidden},
    }
    got = fk.permute_many(state, specs)
    assert list(got) == list(state)
    for name, x in state.items():
        if name in specs:
            assert torch.equal(got[name], _chain(x, specs[name])), name
        else:
            assert got[name] is x  # not permuted: returned as it is
    back = fk.permute_many(got, specs, inverse=True)
    assert all(torch.equal(back[k], state[k]) for k in state)
    as_list = fk.permute_many(list(state.values()), [specs.get(k) for k in state])
    assert all(torch.equal(a, b) for a, b in zip(as_list, got.values(), strict=True))
    buffers = {k: torch.empty_like(v) for k, v in state.items() if k != "fc2.bias"}
    into = fk.permute_many(state, specs, out=buffers)
    for name, x in into.items():
        assert x is (buffers[name] if name in buffers else state[name])
        assert torch.equal(x, got[name])


def test_gradient_is_the_inverse_gather(backend):
    x = _tensor((7, 9), torch.float64).requires_grad_(True)
    p0, p1 = _perm(7, 1), _perm(9, 2)
    weights = _tensor((7, 9), torch.float64, seed=5)
    (fk.permute(x, {0: p0, 1: p1}) * weights).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (_chain(x2, {0: p0, 1: p1}) * weights).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.autograd.gradcheck(lambda t: fk.permute(t, {1: p1}), (x.detach().clone().requires_grad_(),))


@pytest.mark.parametrize(
    ("perm", "message"),
    [
        ([0, 1, 1, 3], "not a permutation: index 1 appears 2 times"),
        ([0, 1, 2], "length 4"),
        ([0, 1, 2, 4], r"indices in \[0, 4\), got 4"),
        ([0, -1, 2, 3], r"got -1"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer dtype"),
        (torch.arange(4).reshape(2, 2), "1-D permutation"),
        ("0123", "1-D integer tensor"),
    ],
)
def test_bad_permutations(perm, message):
    with pytest.raises(fk.FusionError, match=message):
        fk.permute(torch.zeros(4, 3), {0: perm})


def test_bad_specs_and_out():
    x = torch.zeros(4, 3)
    with pytest.raises(fk.ShapeError, match="dim 2"):
        fk.permute(x, {2: [0, 1, 2]})
    with pytest.raises(fk.ShapeError, match="names dim 1 twice"):
        fk.permute(x, {1: [0, 1, 2], -1: [2, 1, 0]})
    with pytest.raises(fk.ArgumentTypeError, match="mapping"):
        fk.permute(x, [[0, 1, 2, 3]])
    with pytest.raises(fk.AliasError, match="in place"):
        fk.permute(x, {0: [1, 0, 2, 3]}, out=x)
    with pytest.raises(fk.AliasError, match="in place"):
        fk.permute_many([x, x.clone()], [{0: [1, 0, 2, 3]}, None], out=[torch.zeros(4, 3), x])
    with pytest.raises(fk.ShapeError, match="no buffer for the permuted tensor '0'"):
        fk.permute_many([x], [{0: [1, 0, 2, 3]}], out=[None])
    with pytest.raises(fk.ArgumentTypeError, match="'out' expected a mapping"):
        fk.permute_many({"a": x}, {"a": {0: [1, 0, 2, 3]}}, out=[x])
    with pytest.raises(fk.ShapeError, match="expected shape"):
        fk.permute(x, {0: [1, 0, 2, 3]}, out=torch.zeros(3, 4))
    with pytest.raises(fk.ShapeError, match="2 entries"):
        fk.permute_many([x, x], [{0: [1, 0, 2, 3]}])
    with pytest.raises(fk.ShapeError, match="not in 'tensors'"):
        fk.permute_many({"a": x}, {"b": {0: [1, 0, 2, 3]}})
    with pytest.raises(fk.ShapeError, match=r"specs\['b'\]\[0\]"):
        fk.permute_many({"a": x, "b": x}, {"b": {0: [1, 0, 0, 3]}})


def test_permute_many_checks_every_out_buffer_before_writing_any():
    x, y = torch.arange(12.0).reshape(4, 3), torch.arange(8.0).reshape(4, 2)
    first = torch.full((4, 3), -7.0)
    with pytest.raises(fk.ShapeError, match="expected shape"):
        fk.permute_many([x, y], [None, {0: [1, 0, 2, 3]}], out=[first, torch.zeros(3, 3)])
    assert bool((first == -7).all())  # out[0] untouched although its tensor needed only a copy
    shared = torch.zeros(4, 3)
    with pytest.raises(fk.AliasError, match="share memory"):
        fk.permute_many([x, x.clone()], [{0: [1, 0, 2, 3]}, {1: [2, 1, 0]}], out=[shared, shared])


def test_opcheck_permute_many():
    xs = [torch.randn(5, 4), torch.randn(4, 3)]
    perms = [torch.tensor([4, 0, 2, 1, 3]), torch.tensor([3, 1, 0, 2])]
    slots = [0, -1, 1, -1]  # per tensor, per dim: the permutation index, -1 for none
    torch.library.opcheck(torch.ops.fusion_kernels.permute_many.default, (xs, perms, slots))
    outs = [torch.empty(5, 4), torch.empty(4, 3)]
    torch.library.opcheck(torch.ops.fusion_kernels.permute_many_out.default, (xs, perms, slots, outs))
