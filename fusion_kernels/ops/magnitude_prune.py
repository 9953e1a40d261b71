"""``magnitude_threshold`` and ``magnitude_prune``: exact top-k by magnitude, deterministic ties;
``global_magnitude_threshold``: the k-th largest magnitude over all the tensors of a model."""

import torch

from .. import _native, _sparse_native, _validate
from .. import reference as ref
from .. import triton as _triton
from .._dispatch import select
from ..errors import DTypeError, ShapeError, WeightError
from ..reference.sparse_merge import PRUNE_OPTIONS
from ._engine import custom_op, empty_like, fake_like, run

OP = "magnitude_prune"


def _torch_prune(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(ref.magnitude_prune(x, k))


def _cpu_prune(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    _sparse_native.sparse_merge(out, None, [x], *PRUNE_OPTIONS, ks=[k])


def _cpu_declines(x, k):
    return _sparse_native.sparse_declines([x], "magnitude", None, [])


def _torch_threshold(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(ref.magnitude_threshold(x, k))


def _cpu_threshold(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(_sparse_native.threshold_value(x, k))


_cpu_prune.declines = _cpu_threshold.declines = _cpu_declines

IMPLS = {"torch": _torch_prune, "cpu": _cpu_prune, "triton": _triton.lazy("sparse_merge", "magnitude_prune")}
THRESHOLD_IMPLS = {
    "torch": _torch_threshold,
    "cpu": _cpu_threshold,
    "triton": _triton.lazy("sparse_merge", "magnitude_threshold"),
}


@custom_op("fusion_kernels::magnitude_prune", mutates_args=())
def _magnitude_prune(x: torch.Tensor, k: int) -> torch.Tensor:
    out = empty_like(x)
    run(OP, IMPLS, out, x, k)
    return out


@_magnitude_prune.register_fake
def _(x, k):
    return fake_like(x)


@custom_op("fusion_kernels::magnitude_threshold", mutates_args=())
def _magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty((), dtype=x.dtype, device=x.device)
    run("magnitude_threshold", THRESHOLD_IMPLS, out, x, k)
    return out


@_magnitude_threshold.register_fake
def _(x, k):
    return x.new_empty(())


def _k(op: str, x: torch.Tensor, density: float | None, k: int | None) -> int:
    if (density is None) == (k is None):
        raise WeightError(f"{op}: pass exactly one of 'density' and 'k', got density={density!r}, k={k!r}")
    if k is None:
        density = _validate.per_model(op, "density", density, 1, 0.0, 1.0)[0]
        return int(density * x.numel())
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= x.numel():
        raise WeightError(f"{op}: argument 'k' expected an int in [0, {x.numel()}], got {k!r}")
    return k


def _input(op: str, x: object) -> torch.Tensor:
    x = _validate.check_tensor(op, "x", x)
    _validate.check_float(op, "x", x)
    return x


def magnitude_prune(x: torch.Tensor, density: float | None = None, *, k: int | None = None) -> torch.Tensor:
    """``x`` with all but its k largest |x| zeroed; k = ⌊density·numel⌋ or given.

    Exactly k elements survive: among equal magnitudes at the threshold, the lowest flat indices
    are kept (NaN ranks above inf). ``x`` is never modified.
    """
    x = _input("magnitude_prune", x)
    return _magnitude_prune(x, _k("magnitude_prune", x, density, k))


def magnitude_threshold(x: torch.Tensor, density: float | None = None, *, k: int | None = None) -> torch.Tensor:
    """The k-th largest |x| as a 0-dim tensor of x's dtype (k = ⌊density·numel⌋ or given, k ≥ 1)."""
    x = _input("magnitude_threshold", x)
    k = _k("magnitude_threshold", x, density, k)
    if k < 1:
        raise WeightError(f"magnitude_threshold: needs k >= 1 (a non-empty x and density >= 1/numel), got k={k}")
    return _magnitude_threshold(x, k)


def _thresholds_torch(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    return torch.stack([ref.magnitude_threshold(x, k) for k in ks])


def _thresholds_cpu(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    return _sparse_native.threshold_values(x, ks)


_thresholds_cpu.declines = lambda x, ks: _cpu_declines(x, 0)
THRESHOLDS_IMPLS = {"torch": _thresholds_torch, "cpu": _thresholds_cpu}


def magnitude_thresholds(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """:func:`magnitude_threshold` for several k at once (the cpu backend draws one sample and makes
    one sweep for all): a 1-D tensor of x's dtype, one value per k (1 ≤ k ≤ numel)."""
    x = _input("magnitude_thresholds", x)
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= x.numel():
            raise WeightError(f"magnitude_thresholds: argument 'ks' expected ints in [1, {x.numel()}], got {k!r}")
    x = x.contiguous()
    return select("magnitude_thresholds", THRESHOLDS_IMPLS, x.device, x.dtype, (x, list(ks)))(x, list(ks))


def _global_torch(xs, bases, models, ks):
    per_model = [xs[m::models] for m in range(models)]
    return ref.global_magnitude_threshold(per_model, bases or None, ks)


def _global_cpu(xs, bases, models, ks):
    numels = [x.numel() for x in xs[::models]]
    keys = _native.lib().global_threshold(
        _native.pointers(xs),
        _native.pointers(bases),
        numels,
        models,
        ks,
        _native.dtype_code(xs[0].dtype),
        _native.threads(),
    )
    return torch.tensor(keys, dtype=torch.int64).to(torch.int32).view(torch.float32)


_global_cpu.declines = lambda xs, bases, models, ks: (
    "the C++ global threshold takes float32, float16 and bfloat16 (float64 runs on 'torch')"
    if xs[0].dtype == torch.float64
    else None
)
GLOBAL_IMPLS = {"torch": _global_torch, "cpu": _global_cpu}


@custom_op("fusion_kernels::global_magnitude_threshold", mutates_args=())
def _global_magnitude_threshold(
    xs: list[torch.Tensor], bases: list[torch.Tensor], models: int, ks: list[int]
) -> torch.Tensor:
    args = ([x.contiguous() for x in xs], [b.contiguous() for b in bases], models, ks)
    return select(GLOBAL_OP, GLOBAL_IMPLS, xs[0].device, xs[0].dtype, args)(*args).to(xs[0].device)


@_global_magnitude_threshold.register_fake
def _(xs, bases, models, ks):
    return xs[0].new_empty(models, dtype=torch.float32)


GLOBAL_OP = "global_magnitude_threshold"


def global_magnitude_threshold(models, k, base=None) -> torch.Tensor:
    """The k-th largest |x − base| over all the tensors of a model, without concatenating them:
    FusionBench's TIES threshold (``kthvalue`` over the flattened model) in two histogram passes.
    τ = x − base in float32, ranked as float32 keys (NaN above inf); see
    :func:`fusion_kernels.reference.global_magnitude_threshold`.

    Args:
        models: one model's tensors (a list), or M such lists of the same shapes (one sweep for all).
        k: 1 ≤ k ≤ the model's element count; one int or one per model.
        base: a list of tensors like each model's (subtracted: task vectors), or None.

    Returns:
        float32: a 0-dim tensor for one list, ``[M]`` for M lists. Keep ``|τ| ≥`` it with
        ``sparse_merge(..., sparsify="threshold")``.
    """
    op = GLOBAL_OP
    nested = isinstance(models, (list, tuple)) and bool(models) and isinstance(models[0], (list, tuple))
    groups = [list(m) for m in models] if nested else [list(models)]
    if not groups[0]:
        raise ShapeError(f"{op}: argument 'models' expected at least one tensor, got none")
    first = groups[0]
    for m, group in enumerate(groups):
        if len(group) != len(first):
            raise ShapeError(
                f"{op}: argument 'models[{m}]' expected {len(first)} tensors like models[0], got {len(group)}"
            )
        for t, x in enumerate(group):
            x = _validate.check_tensor(op, f"models[{m}][{t}]", x)
            _validate.check_float(op, f"models[{m}][{t}]", x)
            _validate.check_like(op, f"models[{m}][{t}]", x, first[t], f"models[0][{t}]")
            if x.dtype != first[0].dtype:
                raise DTypeError(f"{op}: argument 'models[{m}][{t}]' expected dtype {first[0].dtype}, got {x.dtype}")
    bases = []
    if base is not None:
        bases = list(base)
        if len(bases) != len(first):
            raise ShapeError(f"{op}: argument 'base' expected {len(first)} tensors (one per tensor), got {len(bases)}")
        for t, b in enumerate(bases):
            _validate.check_like(
                op, f"base[{t}]", _validate.check_tensor(op, f"base[{t}]", b), first[t], f"models[0][{t}]"
            )
    total = sum(x.numel() for x in first)
    ks = (
        [k] * len(groups)
        if isinstance(k, int) and not isinstance(k, bool)
        else list(k)
        if isinstance(k, (list, tuple))
        else None
    )
    if (
        ks is None
        or len(ks) != len(groups)
        or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= total for v in ks)
    ):
        raise WeightError(f"{op}: argument 'k' expected an int in [1, {total}] (or one per model), got {k!r}")
    flat = [groups[m][t] for t in range(len(first)) for m in range(len(groups))]  # tensor-major
    result = _global_magnitude_threshold(flat, bases, len(groups), ks)
    return result if nested else result[0]
