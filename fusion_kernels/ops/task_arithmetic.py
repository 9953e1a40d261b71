"""``task_arithmetic``: base + Σᵢ wᵢ·(xᵢ − base) (or the sum alone) without materialising the task vectors."""

from collections.abc import Sequence

import torch

from .. import _cuda_native, _native, _validate
from .. import reference as ref
from .. import triton as _triton
from ..errors import ArgumentTypeError
from ._engine import custom_op, empty_like, fake_like, native_kernels, run

OP = "task_arithmetic"


def _torch_impl(
    out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], add_base: bool
) -> None:
    out.copy_(ref.task_arithmetic(base, xs, weights, add_base))


_cpu_impl, _cuda_impl = native_kernels(
    "task_arithmetic",
    lambda base, xs, weights, add_base: (base.data_ptr(), _native.pointers(xs), weights, add_base),
)
_cuda_impl.declines = lambda base, xs, weights, add_base: _cuda_native.too_many(len(xs))
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton.lazy("task_arithmetic"), "cuda": _cuda_impl}


@custom_op("fusion_kernels::task_arithmetic", mutates_args=())
def _task_arithmetic(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], add_base: bool) -> torch.Tensor:
    out = empty_like(base)
    run(OP, IMPLS, out, base, xs, weights, add_base)
    return out


@_task_arithmetic.register_fake
def _(base, xs, weights, add_base):
    return fake_like(base)


def _setup_context(ctx, inputs, output):
    ctx.weights, ctx.add_base = inputs[2], inputs[3]


def _backward(ctx, grad):
    return grad * (float(ctx.add_base) - sum(ctx.weights)), [grad * w for w in ctx.weights], None, None


_task_arithmetic.register_autograd(_backward, setup_context=_setup_context)


@custom_op("fusion_kernels::task_arithmetic_out", mutates_args=("out",))
def _task_arithmetic_out(
    base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], add_base: bool, out: torch.Tensor
) -> None:
    run(OP, IMPLS, out, base, xs, weights, add_base)


@_task_arithmetic_out.register_fake
def _(base, xs, weights, add_base, out):
    return None


def task_arithmetic(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | float | None = None,
    *,
    out: torch.Tensor | None = None,
    add_base: bool = True,
) -> torch.Tensor:
    """out = base + Σᵢ wᵢ·(xᵢ − base) (Ilharco et al., 2023), one pass, float32 accumulation.
    ``add_base=False`` gives the merged task vector Σᵢ wᵢ·(xᵢ − base) alone, summed from zero in
    model order: with unit weights, bit for bit ``sum(x - base for x in xs)`` in float32.

    Args:
        base: the pre-trained tensor ``[*shape]``.
        xs: N fine-tuned tensors like ``base``, or one stacked ``[N, *shape]``.
        weights: the scaling of each task vector (N floats, one float for all, or None for 1 each);
            mergekit's ``lambda`` multiplies all of them.
        out: optional ``[*shape]`` tensor to write into; it may be ``base`` or one of ``xs``.
        add_base: False leaves base out of the result (Iso-C's Σᵢ τᵢ).

    Example:
        >>> fk.task_arithmetic(pretrained, [math_ft, code_ft], 0.4)
        >>> tau = fk.task_arithmetic(pretrained, finetuned, add_base=False)  # Σᵢ (xᵢ − base)
    """
    op = "task_arithmetic"
    base = _validate.check_tensor(op, "base", base)
    _validate.check_float(op, "base", base)
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.inputs_like(op, "xs", xs, base, "base")
    w = _validate.weight_list(op, "weights", weights, len(xs), default=1.0)
    if not isinstance(add_base, bool):
        raise ArgumentTypeError(f"{op}: argument 'add_base' expected a bool, got {type(add_base).__name__}")
    if out is None:
        return _task_arithmetic(base, xs, w, add_base)
    _validate.check_out(op, out, base, "base", {"base": base, **{f"xs[{i}]": x for i, x in enumerate(xs)}})
    _task_arithmetic_out(base, xs, w, add_base, out)
    return out
