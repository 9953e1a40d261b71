"""``cast``: a tensor converted to another floating dtype in one pass, rounded as ``tensor.to`` rounds."""

import torch

from .. import _native, _validate
from ..errors import ArgumentTypeError, DTypeError
from ._engine import custom_op, run

OP = "cast"
NATIVE = (torch.float32, torch.float16, torch.bfloat16)  # the formats the cpu kernel converts between


def _torch_impl(out, x):
    out.copy_(x)


def _cpu_impl(out, x):
    codes = _native.dtype_code(x.dtype), _native.dtype_code(out.dtype)
    _native.lib().cast(out.data_ptr(), x.data_ptr(), *codes, out.numel(), _native.threads())


_cpu_impl.dtypes = NATIVE
_cpu_impl.declines = lambda x: None if x.dtype in NATIVE else f"does not support dtype {x.dtype}"
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::cast_out", mutates_args=("out",))
def _cast_out(x: torch.Tensor, out: torch.Tensor) -> None:
    run(OP, IMPLS, out, x)


@_cast_out.register_fake
def _(x, out):
    return None


def cast(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` converted to ``dtype``, element for element the value of ``x.to(dtype)`` (rounded to
    nearest even, once: every float32, float16 and bfloat16 value is exact in float32)::

        out = round(x)   in the format of dtype

    One pass over memory on the ``cpu`` backend between float32, float16 and bfloat16, where torch
    converts bfloat16 to float16 and back an element at a time (4-6 times slower; this is how the
    pipeline converts a recipe's inputs); float64 and other devices take ``torch``. Not
    differentiable (``x.to`` is).

    Args:
        x: a floating tensor.
        dtype: float32, float16, bfloat16 or float64.
        out: optional tensor of ``x``'s shape and device and of ``dtype``, not overlapping ``x``.

    Example:
        >>> fk.cast(weight_bf16, torch.float16)
    """
    x = _validate.check_tensor(OP, "x", x)
    _validate.check_float(OP, "x", x)
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"{OP}: argument 'dtype' expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _validate.FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in _validate.FLOAT_DTYPES)
        raise DTypeError(f"{OP}: argument 'dtype' expected a floating dtype ({allowed}), got {dtype}")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:  # like x as dtype: one element, broadcast
        like = torch.empty((), dtype=dtype, device=x.device).expand(x.shape)
        _validate.check_out(OP, out, like, f"x as {dtype}", {"x": x})
    _cast_out(x, out)
    return out
