"""Argument checks shared by the public ops. Each raises a FusionError naming op and argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .errors import AliasError, ArgumentTypeError, DeviceError, DTypeError, ShapeError, WeightError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_list(op: str, name: str, xs: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """A non-empty list of tensors from a sequence, or from one stacked tensor ``[N, ...]`` (unbound, no copy)."""
    if isinstance(xs, torch.Tensor):
        if xs.dim() == 0:
            raise ShapeError(
                f"{op}: argument '{name}' expected a sequence of tensors or a stacked [N, ...] tensor, "
                "got a 0-dim tensor"
            )
        items = list(xs.unbind(0))
    elif isinstance(xs, (list, tuple)):
        items = list(xs)
    else:
        raise ArgumentTypeError(f"{op}: argument '{name}' expected a sequence of tensors, got {type(xs).__name__}")
    if not items:
        raise ShapeError(f"{op}: argument '{name}' expected at least one tensor, got none")
    for i, x in enumerate(items):
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"{op}: argument '{name}[{i}]' expected a torch.Tensor, got {type(x).__name__}")
    return items


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of the float tensor x is finite: its min and max are (NaN propagates
    through both), one reduction without the bool tensor ``isfinite`` would allocate (10-25×
    faster on a large matrix)."""
    if x.numel() == 0:
        return True
    if x.dim() >= 2 and not x.is_contiguous() and x.mT.is_contiguous():
        x = x.mT  # the same entries, read in memory order
    low, high = torch.aminmax(x.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{op}: argument '{name}' expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise DTypeError(f"{op}: argument '{name}' expected a floating dtype ({allowed}), got {x.dtype}")


def check_like(op: str, name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """``x`` must have ``ref``'s shape, dtype and device."""
    if x.shape != ref.shape:
        raise ShapeError(
            f"{op}: argument '{name}' expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(x.shape)}"
        )
    if x.dtype != ref.dtype:
        raise DTypeError(f"{op}: argument '{name}' expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise DeviceError(
            f"{op}: argument '{name}' expected device {ref.device} (the device of {ref_name}), got {x.device}"
        )


def inputs_like(op: str, name: str, xs: list[torch.Tensor], ref: torch.Tensor, ref_name: str) -> None:
    for i, x in enumerate(xs):
        check_like(op, f"{name}[{i}]", x, ref, ref_name)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def weight_list(op: str, name: str, weights: object, n: int, default: float) -> list[float]:
    """``n`` finite floats from None (``default`` each), a number or 0-dim tensor (broadcast), or ``n`` numbers."""
    if weights is None:
        return [default] * n
    if isinstance(weights, torch.Tensor):
        if weights.dim() > 1:
            raise ShapeError(
                f"{op}: argument '{name}' expected a 1-D tensor of {n} weights, got shape {tuple(weights.shape)}"
            )
        if weights.is_complex() or weights.dtype == torch.bool:
            raise DTypeError(f"{op}: argument '{name}' expected real weights, got dtype {weights.dtype}")
        values = weights.tolist()
        values = [values] * n if weights.dim() == 0 else values
    elif isinstance(weights, numbers.Real) and not isinstance(weights, bool):
        values = [weights] * n
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        values = list(weights)
    else:
        raise ArgumentTypeError(
            f"{op}: argument '{name}' expected a float, a sequence of floats or a 1-D tensor, "
            f"got {type(weights).__name__}"
        )
    if len(values) != n:
        raise WeightError(f"{op}: argument '{name}' expected {n} weights (one per input), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ArgumentTypeError(f"{op}: argument '{name}[{i}]' expected a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise WeightError(f"{op}: argument '{name}[{i}]' expected a finite weight, got {v}")
        if abs(v) > FLOAT32_MAX:  # sums accumulate in float32: such a weight would turn into inf there
            raise WeightError(f"{op}: argument '{name}[{i}]' expected |weight| <= {FLOAT32_MAX:.4g}, got {v}")
        out.append(float(v))
    return out


def normalized(op: str, name: str, weights: list[float]) -> list[float]:
    try:
        total = math.fsum(weights)
    except OverflowError:
        total = math.inf
    if total == 0.0 or not math.isfinite(total):
        raise WeightError(f"{op}: argument '{name}' expected weights with a finite, non-zero sum, got sum {total}")
    return [w / total for w in weights]


def _byte_span(x: torch.Tensor) -> tuple[int, int]:
    if x.numel() == 0:
        return (0, 0)
    if x.is_contiguous():  # the common case, without the Python loops over the strides
        return (x.data_ptr(), x.data_ptr() + x.numel() * x.element_size())
    start = (
        x.data_ptr()
        + sum(min(0, (size - 1) * st) for size, st in zip(x.shape, x.stride(), strict=True)) * x.element_size()
    )
    last = sum(max(0, (size - 1) * st) for size, st in zip(x.shape, x.stride(), strict=True))
    return (start, x.data_ptr() + (last + 1) * x.element_size())


def check_out(
    op: str,
    out: object,
    ref: torch.Tensor,
    ref_name: str,
    inputs: dict[str, torch.Tensor],
    contiguous: bool = False,
) -> torch.Tensor:
    """``out`` must look like ``ref``, have no self-overlapping elements (be contiguous where the
    kernel writes it as one run: ``contiguous``), and alias inputs only exactly."""
    out = check_tensor(op, "out", out)
    check_like(op, "out", out, ref, ref_name)
    if contiguous and not out.is_contiguous():
        raise ShapeError(f"{op}: argument 'out' expected a contiguous tensor, got strides {tuple(out.stride())}")
    if not out.is_contiguous() and any(st == 0 and size > 1 for size, st in zip(out.shape, out.stride(), strict=True)):
        raise AliasError(
            f"{op}: argument 'out' has elements that share memory (stride {tuple(out.stride())}); "
            "pass a tensor with distinct elements"
        )
    check_overlap(op, out, inputs)
    return out


def check_overlap(op: str, out: torch.Tensor, inputs: dict[str, torch.Tensor], may_alias: bool = True) -> None:
    """``out`` may share memory with an input only by being that very tensor (not at all unless
    ``may_alias``)."""
    lo, hi = _byte_span(out)
    for name, x in inputs.items():
        x_lo, x_hi = _byte_span(x)
        if not (lo < x_hi and x_lo < hi):
            continue
        if not may_alias:
            raise AliasError(f"{op}: argument 'out' overlaps argument '{name}'; pass a tensor disjoint from the inputs")
        if not (x.data_ptr() == out.data_ptr() and x.stride() == out.stride()):
            raise AliasError(
                f"{op}: argument 'out' partially overlaps argument '{name}'; out may be the very "
                "same tensor as an input, or disjoint from it"
            )


def per_model(op: str, name: str, value: object, n: int, lo: float, hi: float) -> list[float]:
    """One float in [lo, hi] per model, from a float (broadcast) or a sequence of n."""
    values = weight_list(op, name, value, n, default=hi)
    for i, v in enumerate(values):
        if not lo <= v <= hi:
            raise WeightError(f"{op}: argument '{name}[{i}]' expected a value in [{lo}, {hi}], got {v}")
    return values


def choice(op: str, name: str, value: object, allowed: tuple) -> object:
    if value not in allowed:
        raise ArgumentTypeError(f"{op}: argument '{name}' expected one of {allowed}, got {value!r}")
    return value


def finite_float(op: str, name: str, value: object) -> float:
    if type(value) is float and math.isfinite(value):  # the common case, without the ABC check
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise WeightError(f"{op}: argument '{name}' expected a finite float, got {value!r}")
    return float(value)


def seed(op: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ArgumentTypeError(f"{op}: argument 'seed' expected an int in [0, 2**63), got {value!r}")
    return int(value)
