"""``permute`` and ``permute_many``: gathers along permuted dims in one pass per tensor, a whole
state dict per call (git re-basin's P W Qᵀ)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import _cuda_native, _native, _validate
from .. import reference as ref
from .. import triton as _triton
from .._dispatch import select
from .._layout import merged_dims
from ..errors import AliasError, ArgumentTypeError, DeviceError, ShapeError
from ._engine import custom_op, empty_like

OP = "permute"
Perm = torch.Tensor | Sequence[int]
Spec = Mapping[int, Perm]


def _torch_impl(outs, xs, perms, slots) -> None:
    for out, x, dims in zip(outs, xs, _split(slots, xs), strict=True):
        out.copy_(ref.permute(x, {d: perms[i] for d, i in enumerate(dims) if i >= 0}))


def _cpu_impl(outs, xs, perms, slots) -> None:
    table = [p.data_ptr() for p in perms]
    _native.lib().permute_many(
        [o.data_ptr() for o in outs],
        [x.data_ptr() for x in xs],
        [x.element_size() for x in xs],
        [list(x.shape) for x in xs],
        [[table[i] if i >= 0 else 0 for i in dims] for dims in _split(slots, xs)],
        _native.threads(),
    )


_torch_impl.dtypes = _cpu_impl.dtypes = None  # bytes are moved, so every dtype works
_triton_impl = _triton.lazy("permute", "permute_many")
_triton_impl.dtypes = None
_triton_impl.declines = _triton.lazy("permute", "declines")


def _cuda_impl(outs, xs, perms, slots) -> None:
    lib, tensors = _cuda_native.lib(), []
    for out, x, dims in zip(outs, xs, _split(slots, xs), strict=True):
        sizes, strides, tables = merged_dims(list(x.shape), dims, perms)
        tables = [0 if t is None else t.data_ptr() for t in tables]
        tensors.append(lib.PermuteTensor(out.data_ptr(), x.data_ptr(), x.element_size(), sizes, strides, tables))
    lib.permute_many(tensors, _cuda_native.stream(xs[0]))


def _cuda_declines(xs):
    if any(x.element_size() not in (1, 2, 4, 8) for x in xs):
        return "moves elements of 1, 2, 4 or 8 bytes (complex128 runs on 'torch')"
    if any(x.dim() > 8 for x in xs):
        return "takes tensors of at most 8 dims"
    return None


_cuda_impl.dtypes = None
_cuda_impl.declines = _cuda_declines
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton_impl, "cuda": _cuda_impl}


def _split(slots: list[int], xs: list[torch.Tensor]) -> list[list[int]]:
    """Per tensor, per dim: the index into ``perms`` of that dim's permutation, or -1."""
    out, at = [], 0
    for x in xs:
        out.append(slots[at : at + x.dim()])
        at += x.dim()
    return out


def _run(outs: list[torch.Tensor], xs: list[torch.Tensor], perms: list[torch.Tensor], slots: list[int]) -> None:
    impl = select(OP, IMPLS, xs[0].device, xs[0].dtype, (xs,))
    targets = [o if o.is_contiguous() else empty_like(o) for o in outs]
    impl(targets, [x.contiguous() for x in xs], perms, slots)
    for o, t in zip(outs, targets, strict=True):
        if t is not o:
            o.copy_(t)


@custom_op("fusion_kernels::permute_many", mutates_args=())
def _permute_many(xs: list[torch.Tensor], perms: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
    outs = [empty_like(x) for x in xs]
    _run(outs, xs, perms, slots)
    return outs


@_permute_many.register_fake
def _(xs, perms, slots):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _setup_context(ctx, inputs, output):
    ctx.perms, ctx.slots = inputs[1], inputs[2]


def _backward(ctx, grads):
    # The gradient of a gather by p is the gather by p's inverse.
    inverse = [ref.inverse_permutation(p) for p in ctx.perms]
    present = [i for i, g in enumerate(grads) if g is not None]
    dims = _split(ctx.slots, grads)
    back = _permute_many([grads[i] for i in present], inverse, [s for i in present for s in dims[i]])
    out = [None] * len(grads)
    for i, g in zip(present, back, strict=True):
        out[i] = g
    return out, [None] * len(ctx.perms), None


_permute_many.register_autograd(_backward, setup_context=_setup_context)


@custom_op("fusion_kernels::permute_many_out", mutates_args=("outs",))
def _permute_many_out(
    xs: list[torch.Tensor], perms: list[torch.Tensor], slots: list[int], outs: list[torch.Tensor]
) -> None:
    _run(outs, xs, perms, slots)


@_permute_many_out.register_fake
def _(xs, perms, slots, outs):
    return None


def _check_out(op: str, name: str, out, x: torch.Tensor, x_name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``out`` must look like ``x`` and share no storage with any input (a gather cannot run in place)."""
    out = _validate.check_out(op, out, x, x_name, {})
    if out.numel() and any(t.numel() and _same_storage(out, t) for t in inputs):
        raise AliasError(f"{op}: argument '{name}' shares memory with an input; a gather cannot run in place")
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Perms:
    """Validated permutations, each checked (and inverted) once however many tensors share it."""

    def __init__(self, op: str, inverse: bool):
        self.op, self.inverse = op, inverse
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self._keep: list[object] = []  # the callers' objects, so their ids stay unique

    def slots(self, name: str, x: torch.Tensor, spec: Spec) -> list[int]:
        op = self.op
        if not isinstance(spec, Mapping):
            raise ArgumentTypeError(
                f"{op}: argument '{name}' expected a mapping {{dim: permutation}}, got {type(spec).__name__}"
            )
        slots = [-1] * x.dim()
        for dim, perm in spec.items():
            if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
                raise ShapeError(
                    f"{op}: argument '{name}' has dim {dim!r}, expected an int in [{-x.dim()}, {x.dim()}) "
                    f"for a tensor of shape {tuple(x.shape)}"
                )
            d = dim % x.dim()
            if slots[d] >= 0:
                raise ShapeError(f"{op}: argument '{name}' names dim {d} twice")
            slots[d] = self._add(f"{name}[{dim}]", perm, x.shape[d], x.device)
        return slots

    def _add(self, name: str, perm: Perm, size: int, device: torch.device) -> int:
        key = id(perm)
        if key in self._index and self.tensors[self._index[key]].numel() == size:
            return self._index[key]
        p = _check_permutation(self.op, name, perm, size)
        p = ref.inverse_permutation(p) if self.inverse else p
        self._keep.append(perm)
        self._index[key] = len(self.tensors)
        self.tensors.append(p.to(device))
        return self._index[key]


def _check_permutation(op: str, name: str, perm: Perm, size: int) -> torch.Tensor:
    """``perm`` as a contiguous int64 CPU tensor, after checking it is a permutation of range(size)."""
    if isinstance(perm, torch.Tensor):
        p = perm
    elif isinstance(perm, Sequence) and not isinstance(perm, (str, bytes)):
        try:
            p = torch.as_tensor(list(perm), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ArgumentTypeError(f"{op}: argument '{name}' expected a sequence of ints ({exc})") from None
    else:
        raise ArgumentTypeError(f"{op}: argument '{name}' expected a 1-D integer tensor, got {type(perm).__name__}")
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise ArgumentTypeError(f"{op}: argument '{name}' expected an integer dtype, got {p.dtype}")
    if p.dim() != 1 or p.numel() != size:
        raise ShapeError(
            f"{op}: argument '{name}' expected a 1-D permutation of length {size}, got shape {tuple(p.shape)}"
        )
    p = p.detach().to("cpu", torch.int64).contiguous()
    if size == 0:
        return p
    lo, hi = int(p.min()), int(p.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ShapeError(f"{op}: argument '{name}' expected indices in [0, {size}), got {bad}")
    counts = torch.bincount(p, minlength=size)
    if not bool((counts == 1).all()):
        twice = int(torch.nonzero(counts > 1)[0])
        raise ShapeError(
            f"{op}: argument '{name}' is not a permutation: index {twice} appears {int(counts[twice])} times"
        )
    return p


def permute(x: torch.Tensor, perms: Spec, *, inverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i₀, …, iₖ] = x[p₀[i₀], …, pₖ[iₖ]] for ``perms = {dim: p}``, identity on other dims, in one pass.

    ``x.index_select(d0, p0).index_select(d1, p1)…`` without the intermediate copies. With
    ``inverse=True`` each p is replaced by its inverse, which undoes ``permute(x, perms)``.

    Args:
        x: a tensor of any dtype (integer buffers too) and shape, e.g. a conv weight ``(out, in, kh, kw)``.
        perms: ``{dim: permutation}``; a permutation is a 1-D integer tensor or sequence holding each
            of ``0 … x.shape[dim]-1`` once. Negative dims count from the end.
        inverse: apply the inverse permutations.
        out: optional tensor like ``x`` to write into; it must not overlap ``x``.

    Differentiable: the gradient is the inverse gather. Example (git re-basin, P W Qᵀ):
        >>> fk.permute(w, {0: p_out, 1: p_in})
    """
    x = _validate.check_tensor(OP, "x", x)
    table = _Perms(OP, inverse)
    slots = table.slots("perms", x, perms)
    if out is None:
        return _permute_many([x], table.tensors, slots)[0]
    out = _check_out(OP, "out", out, x, "x", [x])
    _permute_many_out([x], table.tensors, slots, [out])
    return out


def permute_many(
    tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    specs: Sequence[Spec | None] | Mapping[str, Spec],
    *,
    inverse: bool = False,
    out: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor] | dict[str, torch.Tensor]:
    """:func:`permute` for many tensors in one call: one pass each, work spread over threads by bytes.

    Args:
        tensors: a list of tensors, or a state dict ``{name: tensor}``; all on one device.
        specs: per tensor, ``{dim: permutation}`` (a list aligned with ``tensors``, or a dict by
            name where missing names mean no permutation). A permutation shared by several tensors
            (the same object) is validated once.
        inverse: apply the inverse permutations.
        out: optional buffers to write into, aligned with ``tensors`` like ``specs`` (reuse them
            across calls to skip allocating and page-faulting new outputs). Every permuted tensor
            needs one; an unpermuted tensor with a buffer is copied into it.

    Returns:
        A list or dict like ``tensors``, holding the ``out`` buffers where given; tensors without
        permutations or buffers are returned as they are (not copied).
    """
    op = "permute_many"
    if isinstance(tensors, Mapping):
        if not isinstance(specs, Mapping):
            raise ArgumentTypeError(f"{op}: argument 'specs' expected a mapping by name, got {type(specs).__name__}")
        unknown = sorted(set(specs) - set(tensors))
        if unknown:
            raise ShapeError(f"{op}: argument 'specs' names tensors not in 'tensors': {unknown[:5]}")
        if out is not None and not isinstance(out, Mapping):
            raise ArgumentTypeError(f"{op}: argument 'out' expected a mapping by name, got {type(out).__name__}")
        names = list(tensors)
        outs = None if out is None else [out.get(n) for n in names]
        results = _permute_list(op, [tensors[n] for n in names], [specs.get(n) for n in names], names, inverse, outs)
        return dict(zip(names, results, strict=True))
    tensors = list(tensors)
    for name, value in (("specs", specs), ("out", out)):
        if value is None and name == "out":
            continue
        if isinstance(value, Mapping) or not isinstance(value, Sequence):
            raise ArgumentTypeError(f"{op}: argument '{name}' expected a sequence aligned with 'tensors'")
        if len(value) != len(tensors):
            raise ShapeError(
                f"{op}: argument '{name}' expected {len(tensors)} entries (one per tensor), got {len(value)}"
            )
    names = [str(i) for i in range(len(tensors))]
    return _permute_list(op, tensors, list(specs), names, inverse, None if out is None else list(out))


def _permute_list(op, tensors, specs, names, inverse, outs) -> list[torch.Tensor]:
    table = _Perms(op, inverse)
    chosen, slots = [], []
    for i, (name, x, spec) in enumerate(zip(names, tensors, specs, strict=True)):
        x = _validate.check_tensor(op, f"tensors[{name!r}]", x)
        if x.device != tensors[0].device:
            raise DeviceError(f"{op}: argument 'tensors[{name!r}]' expected device {tensors[0].device}, got {x.device}")
        s = table.slots(f"specs[{name!r}]", x, spec or {})
        if any(v >= 0 for v in s):
            chosen.append(i)
            slots += s
    results = list(tensors)
    if outs is not None:
        given = []  # every buffer is checked before any is written
        for i, (name, x, buffer) in enumerate(zip(names, tensors, outs, strict=True)):
            if buffer is None and i in chosen:
                raise ShapeError(f"{op}: argument 'out' has no buffer for the permuted tensor {name!r}")
            if buffer is not None:
                results[i] = _check_out(op, f"out[{name!r}]", buffer, x, f"tensors[{name!r}]", tensors)
                for j in given:
                    if results[i].numel() and results[j].numel() and _same_storage(results[i], results[j]):
                        raise AliasError(f"{op}: arguments 'out[{name!r}]' and 'out[{names[j]!r}]' share memory")
                given.append(i)
        for i in given:
            if i not in chosen:
                results[i].copy_(tensors[i])
        if chosen:
            _permute_many_out([tensors[i] for i in chosen], table.tensors, slots, [results[i] for i in chosen])
    elif chosen:
        for i, y in zip(chosen, _permute_many([tensors[i] for i in chosen], table.tensors, slots), strict=True):
            results[i] = y
    return results
