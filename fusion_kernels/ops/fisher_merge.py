"""``fisher_merge``: Fisher-weighted averaging (Matena & Raffel, 2022) in one pass."""

import math
from collections.abc import Sequence

import torch

from .. import _cuda_native, _native, _validate
from .. import reference as ref
from .. import triton as _triton
from ..errors import WeightError
from ._engine import custom_op, empty_like, fake_like, native_kernels, run

OP = "fisher_merge"


def _torch_impl(out, xs: list[torch.Tensor], fisher: list[torch.Tensor], weights: list[float], eps: float) -> None:
    out.copy_(ref.fisher_merge(xs, fisher, weights, eps))


_cpu_impl, _cuda_impl = native_kernels(
    "fisher_merge",
    lambda xs, fisher, weights, eps: (_native.pointers(xs), _native.pointers(fisher), weights, eps),
)


_cuda_impl.declines = lambda xs, fisher, weights, eps: _cuda_native.too_many(len(xs))
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton.lazy("fisher_merge"), "cuda": _cuda_impl}


@custom_op("fusion_kernels::fisher_merge", mutates_args=())
def _fisher_merge(xs: list[torch.Tensor], fisher: list[torch.Tensor], weights: list[float], eps: float) -> torch.Tensor:
    out = empty_like(xs[0])
    run(OP, IMPLS, out, xs, fisher, weights, eps)
    return out


@_fisher_merge.register_fake
def _(xs, fisher, weights, eps):
    return fake_like(xs[0])


@custom_op("fusion_kernels::fisher_merge_out", mutates_args=("out",))
def _fisher_merge_out(
    xs: list[torch.Tensor], fisher: list[torch.Tensor], weights: list[float], eps: float, out: torch.Tensor
) -> None:
    run(OP, IMPLS, out, xs, fisher, weights, eps)


@_fisher_merge_out.register_fake
def _(xs, fisher, weights, eps, out):
    return None


def fisher_merge(
    xs: Sequence[torch.Tensor] | torch.Tensor,
    fisher: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | float | None = None,
    *,
    eps: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element Fisher-weighted average of N models, accumulated in float32::

        out = Σᵢ wᵢ·Fᵢ·xᵢ / (Σᵢ wᵢ·Fᵢ + eps)    where Σᵢ wᵢ·Fᵢ ≠ 0
        out = Σᵢ wᵢ·xᵢ / Σᵢ wᵢ                  where Σᵢ wᵢ·Fᵢ = 0

    Where no model carries Fisher mass (e.g. a parameter no training example touched) the result
    falls back to the weighted average rather than collapsing to 0.

    Args:
        xs: N parameter tensors ``[*shape]`` (or stacked ``[N, *shape]``).
        fisher: N diagonal Fisher estimates like ``xs`` (same dtype), expected ≥ 0.
        weights: N non-negative model weights with a positive sum (None: equal weights).
        eps: ≥ 0, added to the denominator (the "EWC form" damping).
        out: optional ``[*shape]`` tensor to write into; it may be one of ``xs``.
    """
    op = "fisher_merge"
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.check_float(op, "xs[0]", xs[0])
    _validate.inputs_like(op, "xs", xs, xs[0], "xs[0]")
    fisher = _validate.tensor_list(op, "fisher", fisher)
    if len(fisher) != len(xs):
        raise _validate.ShapeError(
            f"{op}: argument 'fisher' expected {len(xs)} tensors (one per input), got {len(fisher)}"
        )
    _validate.inputs_like(op, "fisher", fisher, xs[0], "xs[0]")
    w = _validate.weight_list(op, "weights", weights, len(xs), default=1.0)
    for i, v in enumerate(w):
        if v < 0:
            raise WeightError(f"{op}: argument 'weights[{i}]' expected a non-negative weight, got {v}")
    _validate.normalized(op, "weights", w)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise WeightError(f"{op}: argument 'eps' expected a finite float >= 0, got {eps!r}")
    if out is None:
        return _fisher_merge(xs, fisher, w, float(eps))
    inputs = {**{f"xs[{i}]": x for i, x in enumerate(xs)}, **{f"fisher[{i}]": f for i, f in enumerate(fisher)}}
    _validate.check_out(op, out, xs[0], "xs[0]", inputs)
    _fisher_merge_out(xs, fisher, w, float(eps), out)
    return out
