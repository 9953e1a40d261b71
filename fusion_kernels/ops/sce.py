"""``sce_variance``, ``sce_select`` and ``sce_energies``: SCE's select and calculate statistics, one
pass each."""

from collections.abc import Sequence

import torch

from .. import _native, _sparse_native, _validate
from .._dispatch import select
from ..errors import WeightError
from ..reference import composite
from ..reference.weighted_sum import accumulation_dtype
from .magnitude_prune import magnitude_threshold

CHUNK = 1 << 18  # elements per step of the torch backend: its float32 temporaries stay small


def _variance_torch(var, base, xs):
    for where, (b, *pieces) in composite.flat_pieces([base, *xs], CHUNK):
        var.view(-1)[where] = composite.sce_variance(b, pieces)
    return int(torch.count_nonzero(var))


def _variance_cpu(var, base, xs):
    if base.numel() == 0:  # no data pointer to hand over
        return 0
    code = _native.dtype_code(base.dtype)
    return _native.lib().sce_variance(
        var.data_ptr(), base.data_ptr(), _native.pointers(xs), base.numel(), code, _native.threads()
    )


def _energies_torch(base, xs, mask):
    totals = [0.0] * len(xs)
    for where, (b, *pieces) in composite.flat_pieces([base, *xs], CHUNK):
        part = composite.sce_energies(b, pieces, None if mask is None else mask.reshape(-1)[where])
        totals = [t + e for t, e in zip(totals, part, strict=True)]
    return totals


def _energies_cpu(base, xs, mask):
    if base.numel() == 0:
        return [0.0] * len(xs)
    code = _native.dtype_code(base.dtype)
    where = 0 if mask is None else mask.data_ptr()
    return _native.lib().sce_energies(
        base.data_ptr(), _native.pointers(xs), where, base.numel(), code, _native.threads()
    )


def _select_torch(mask, base, xs, var, threshold, k, cut):
    flat_var, flat_mask = var.view(-1), mask.view(-1)
    ties = k - int(torch.count_nonzero(~(flat_var <= threshold)))  # NaN counts as above
    for start in range(0, var.numel(), CHUNK):
        where = slice(start, start + CHUNK)
        v = flat_var[where]
        equal = v == threshold
        if cut is None:
            keep_equal = equal & (torch.cumsum(equal, 0) <= ties)
            ties -= int(torch.count_nonzero(keep_equal))
        else:
            keep_equal = equal & (torch.arange(start, start + v.numel(), device=v.device) < cut)
        torch.bitwise_or(~(v <= threshold), keep_equal, out=flat_mask[where])
    return _energies_torch(base, xs, mask), int(torch.count_nonzero(mask))


def _select_cpu(mask, base, xs, var, threshold, k, cut):
    if base.numel() == 0:
        return [0.0] * len(xs), 0
    code = _native.dtype_code(base.dtype)
    sums = _native.lib().sce_select(
        mask.data_ptr(),
        base.data_ptr(),
        _native.pointers(xs),
        var.data_ptr(),
        threshold,
        k,
        -1 if cut is None else cut,
        base.numel(),
        code,
        _native.threads(),
    )
    return sums[:-1], int(sums[-1])


def _threshold_torch(var, k):
    return float(magnitude_threshold(var, k=k)), None


def _threshold_cpu(var, k):
    (key, cut), *_ = _sparse_native.select(None, [var], [0], [k])
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32)), cut


# the C++ kernels take 16- and 32-bit floats; float64 runs on the torch backend
_variance_cpu.dtypes = _energies_cpu.dtypes = _select_cpu.dtypes = (torch.float32, torch.float16, torch.bfloat16)
_threshold_cpu.dtypes = (torch.float32,)
VARIANCE_IMPLS = {"torch": _variance_torch, "cpu": _variance_cpu}
ENERGIES_IMPLS = {"torch": _energies_torch, "cpu": _energies_cpu}
SELECT_IMPLS = {"torch": _select_torch, "cpu": _select_cpu}
THRESHOLD_IMPLS = {"torch": _threshold_torch, "cpu": _threshold_cpu}


def _like(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stand-in of ``base``'s shape and device in ``dtype`` to check arguments against (no storage)."""
    return base.new_empty((), dtype=dtype).expand(base.shape)


def _check(op: str, base, xs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = _validate.check_tensor(op, "base", base)
    _validate.check_float(op, "base", base)
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.inputs_like(op, "xs", xs, base, "base")
    return base.contiguous(), [x.contiguous() for x in xs]


def sce_variance(
    base: torch.Tensor, xs: Sequence[torch.Tensor] | torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """SCE's select statistic (mergekit's ``sce``): each element's variance across the task vectors
    τᵢ = xᵢ − base, in float32 (float64 for float64 inputs), in the reference's order of operations::

        mean = Σᵢ τᵢ / N,   var = Σᵢ (τᵢ − mean)² / N

    Returns (var shaped like ``base``, how many variances are not 0): SCE keeps the
    ⌊select_topk · nonzero⌋ elements of largest variance. ``out``: a contiguous tensor of that
    shape and dtype, apart from the inputs, to write the variances into."""
    op = "sce_variance"
    base, xs = _check(op, base, xs)
    wide = accumulation_dtype(base.dtype)
    if out is None:
        out = torch.empty(base.shape, dtype=wide, device=base.device)
    else:
        _validate.check_out(op, out, _like(base, wide), "base, in its working precision", {}, contiguous=True)
        _validate.check_overlap(op, out, {"base": base, **{f"xs[{i}]": x for i, x in enumerate(xs)}}, may_alias=False)
    nonzero = select(op, VARIANCE_IMPLS, base.device, base.dtype, (out, base, xs))(out, base, xs)
    return out, nonzero


def sce_energies(
    base: torch.Tensor, xs: Sequence[torch.Tensor] | torch.Tensor, mask: torch.Tensor | None = None
) -> list[float]:
    """SCE's calculate statistic: per model, Σ (maskᵢ·τᵢ)² over the kept elements (``mask``: a bool
    tensor shaped like ``base``; None keeps all), accumulated in float64 (the cpu backend squares and
    adds in float32 within runs of 1024 elements). Returns N floats."""
    op = "sce_energies"
    base, xs = _check(op, base, xs)
    if mask is not None:
        mask = _validate.check_tensor(op, "mask", mask)
        _validate.check_like(op, "mask", mask, _like(base, torch.bool), "base, as bool")
        mask = mask.contiguous()
    impl = select(op, ENERGIES_IMPLS, base.device, base.dtype, (base, xs, mask))
    return [float(e) for e in impl(base, xs, mask)]


def sce_select(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor] | torch.Tensor,
    var: torch.Tensor,
    threshold: float,
    k: int,
    out: torch.Tensor | None = None,
    *,
    cut: int | None = None,
) -> tuple[torch.Tensor, int, list[float]]:
    """SCE's select and calculate steps fused: the mask of the k largest variances (``var`` from
    :func:`sce_variance`; ``threshold``: its k-th largest value, e.g. from
    :func:`fusion_kernels.magnitude_threshold`; ties at it: the lowest indices; NaN ranks above every
    number) and each model's Σ (mask·τᵢ)² over it, in one pass over the variances and the inputs, and
    one more over the variances to place the ties unless ``cut`` is given: the flat index just past
    the last element equal to the threshold among the k largest, where the search for the threshold
    found it (the variances equal to it are kept below it). Returns (mask: bool like ``base``,
    written into ``out`` when given; how many it keeps, k where the threshold is right; N energies as
    :func:`sce_energies`)."""
    op = "sce_select"
    base, xs = _check(op, base, xs)
    var = _validate.check_tensor(op, "var", var)
    _validate.check_like(op, "var", var, _like(base, accumulation_dtype(base.dtype)), "base, in its working precision")
    threshold = _validate.finite_float(op, "threshold", threshold)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= base.numel():
        raise WeightError(f"{op}: argument 'k' expected an int in [0, {base.numel()}], got {k!r}")
    if out is None:
        out = torch.empty(base.shape, dtype=torch.bool, device=base.device)
    else:
        _validate.check_out(op, out, _like(base, torch.bool), "base, as bool", {}, contiguous=True)
    if cut is not None and (not isinstance(cut, int) or isinstance(cut, bool) or not 0 <= cut <= base.numel()):
        raise WeightError(f"{op}: argument 'cut' expected None or an int in [0, {base.numel()}], got {cut!r}")
    if k == 0:  # no k-th largest: nothing is kept
        return out.zero_(), 0, [0.0] * len(xs)
    var = var.contiguous()
    impl = select(op, SELECT_IMPLS, base.device, base.dtype, (out, base, xs, var, threshold, k, cut))
    energies, kept = impl(out, base, xs, var, threshold, k, cut)
    return out, kept, [float(e) for e in energies]


def top_k_threshold(var: torch.Tensor, k: int) -> tuple[float, int | None]:
    """The k-th largest of the variances ``var`` from :func:`sce_variance` (1 ≤ k ≤ numel; NaN ranks
    above every number) and, on the cpu backend for k < numel, ``sce_select``'s ``cut`` for it (None
    elsewhere)."""
    if k >= var.numel():  # the least: every element kept, ties and all
        return float(magnitude_threshold(var, k=k)), None
    var = var.contiguous()
    return select("sce_select", THRESHOLD_IMPLS, var.device, var.dtype, (var, k))(var, k)
