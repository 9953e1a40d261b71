"""``weighted_sum`` and ``weighted_average``: Σᵢ wᵢ·xᵢ in one pass over the inputs."""

from collections.abc import Sequence

import torch

from .. import _cuda_native, _native, _validate
from .. import reference as ref
from .. import triton as _triton
from ._engine import custom_op, empty_like, fake_like, native_kernels, run

OP = "weighted_sum"


def _torch_impl(out: torch.Tensor, xs: list[torch.Tensor], weights: list[float]) -> None:
    out.copy_(ref.weighted_sum(xs, weights))


_cpu_impl, _cuda_impl = native_kernels("weighted_sum", lambda xs, weights: (_native.pointers(xs), weights))
_cuda_impl.declines = lambda xs, weights: _cuda_native.too_many(len(xs))
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton.lazy("weighted_sum"), "cuda": _cuda_impl}


@custom_op("fusion_kernels::weighted_sum", mutates_args=())
def _weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = empty_like(xs[0])
    run(OP, IMPLS, out, xs, weights)
    return out


@_weighted_sum.register_fake
def _(xs, weights):
    return fake_like(xs[0])


def _setup_context(ctx, inputs, output):
    ctx.weights = inputs[1]


def _backward(ctx, grad):
    return [grad * w for w in ctx.weights], None


_weighted_sum.register_autograd(_backward, setup_context=_setup_context)


@custom_op("fusion_kernels::weighted_sum_out", mutates_args=("out",))
def _weighted_sum_out(xs: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> None:
    run(OP, IMPLS, out, xs, weights)


@_weighted_sum_out.register_fake
def _(xs, weights, out):
    return None


def _call(op: str, xs, weights: list[float], out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return _weighted_sum(xs, weights)
    _validate.check_out(op, out, xs[0], "xs[0]", {f"xs[{i}]": x for i, x in enumerate(xs)})
    _weighted_sum_out(xs, weights, out)
    return out


def _inputs(op: str, xs) -> list[torch.Tensor]:
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.check_float(op, "xs[0]", xs[0])
    _validate.inputs_like(op, "xs", xs, xs[0], "xs[0]")
    return xs


def weighted_sum(
    xs: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = Σᵢ wᵢ·xᵢ, read once, accumulated in float32 (float64 for float64), rounded once to the dtype.

    Args:
        xs: N same-shape, same-dtype, same-device tensors ``[*shape]``, or one stacked ``[N, *shape]``.
        weights: N finite floats (or a 1-D tensor); one float applies to every input; None means all 1.
        out: optional ``[*shape]`` tensor to write into; it may be one of ``xs`` (in-place merge).

    Example:
        >>> fk.weighted_sum([a, b, c], [0.5, 0.25, 0.25])
    """
    xs = _inputs("weighted_sum", xs)
    w = _validate.weight_list("weighted_sum", "weights", weights, len(xs), default=1.0)
    return _call("weighted_sum", xs, w, out)


def weighted_average(
    xs: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = Σᵢ wᵢ·xᵢ / Σⱼ wⱼ: :func:`weighted_sum` with normalised weights (None: the plain mean).

    Weights must have a non-zero sum. A model soup of N checkpoints is ``weighted_average(xs)``.
    """
    xs = _inputs("weighted_average", xs)
    w = _validate.weight_list("weighted_average", "weights", weights, len(xs), default=1.0)
    return _call("weighted_average", xs, _validate.normalized("weighted_average", "weights", w), out)
