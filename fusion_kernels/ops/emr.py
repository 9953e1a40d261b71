"""``emr_statistics``: EMR's unified task vector, masks and rescale sums in one pass."""

from collections.abc import Sequence

import torch

from .. import _native, _validate
from .. import reference as ref
from .._dispatch import select
from ._engine import custom_op

OP = "emr_statistics"


def _torch_impl(base, xs):
    return ref.emr_statistics(base, xs)


def _cpu_impl(base, xs):
    unified = torch.empty_like(base)
    masks = torch.empty((len(xs), *base.shape), dtype=torch.bool)
    flat = _native.lib().emr(
        unified.data_ptr(),
        [m.data_ptr() for m in masks.unbind(0)] if base.numel() else [0] * len(xs),
        base.data_ptr(),
        _native.pointers(xs),
        base.numel(),
        _native.dtype_code(base.dtype),
        _native.threads(),
    )
    return unified, masks, torch.tensor(flat, dtype=torch.float64).reshape(len(xs), 2)


_cpu_impl.declines = lambda base, xs: (
    "the C++ EMR kernel takes float32, float16 and bfloat16 (float64 runs on 'torch')"
    if base.dtype == torch.float64
    else None
)
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::emr_statistics", mutates_args=())
def _emr_statistics(base: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (base.contiguous(), [x.contiguous() for x in xs])
    return select(OP, IMPLS, base.device, base.dtype, args)(*args)


@_emr_statistics.register_fake
def _(base, xs):
    n = len(xs)
    return (
        torch.empty_like(base),
        base.new_empty((n, *base.shape), dtype=torch.bool),
        base.new_empty((n, 2), dtype=torch.float64),
    )


def emr_statistics(base: torch.Tensor, xs: Sequence[torch.Tensor] | torch.Tensor):
    """EMR-merging's statistics of one tensor (Huang et al., 2024, as FusionBench computes them),
    one pass over the inputs, float32 arithmetic; formula in :mod:`fusion_kernels.reference.emr`.

    Returns:
        (unified: like ``base`` — σ·max |τᵢ| over the τᵢ agreeing with σ = sign(Σ τᵢ), masks: bool
        ``[N, *shape]`` — τᵢ·σ > 0, sums: float64 ``[N, 2]`` — Σ|τᵢ| and Σ|maskᵢ·unified|).
        Task i's model is base + rᵢ·maskᵢ·unified, rᵢ from the sums over all tensors.
    """
    base = _validate.check_tensor(OP, "base", base)
    _validate.check_float(OP, "base", base)
    xs = _validate.tensor_list(OP, "xs", xs)
    _validate.inputs_like(OP, "xs", xs, base, "base")
    return _emr_statistics(base, xs)
