"""``nearswap``: mergekit's nearswap in one fused pass — the tuned value where it stays near the
base, the base where it moved far, interpolated in between."""

import math

import torch

from .. import _native, _validate
from ..errors import WeightError
from ..reference import composite
from ._engine import custom_op, empty_like, fake_like, run

OP = "nearswap"


def _torch_impl(out, base, x, t):
    out.copy_(composite.nearswap(base, x, t))


def _cpu_impl(out, base, x, t):
    _native.lib().nearswap(
        out.data_ptr(), base.data_ptr(), x.data_ptr(), t, out.numel(), _native.dtype_code(out.dtype), _native.threads()
    )


IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::nearswap", mutates_args=())
def _nearswap(base: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    out = empty_like(base)
    run(OP, IMPLS, out, base, x, t)
    return out


@_nearswap.register_fake
def _(base, x, t):
    return fake_like(base)


@custom_op("fusion_kernels::nearswap_out", mutates_args=("out",))
def _nearswap_out(base: torch.Tensor, x: torch.Tensor, t: float, out: torch.Tensor) -> None:
    run(OP, IMPLS, out, base, x, t)


@_nearswap_out.register_fake
def _(base, x, t, out):
    return None


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per element, in float32 (float64 for float64 inputs), rounded once to the inputs' dtype::

        w = clamp(t / max(|base − x|, 1e-6), 0, 1),   out = lerp(base, x, w)

    so an element within t of the base takes x, one far from it stays near the base.

    Args:
        base, x: like tensors (mergekit's base model and the one other).
        t: the distance scale (finite, ≥ 0).
        out: optional tensor like ``base`` to write into; it may be ``base`` or ``x`` itself.

    Example:
        >>> fk.nearswap(base_weight, tuned_weight, t=1e-3)
    """
    base = _validate.check_tensor(OP, "base", base)
    _validate.check_float(OP, "base", base)
    _validate.check_like(OP, "x", _validate.check_tensor(OP, "x", x), base, "base")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        raise WeightError(f"{OP}: argument 't' expected a finite float >= 0, got {t!r}")
    if out is None:
        return _nearswap(base, x, float(t))
    _validate.check_out(OP, out, base, "base", {"base": base, "x": x})
    _nearswap_out(base, x, float(t), out)
    return out
