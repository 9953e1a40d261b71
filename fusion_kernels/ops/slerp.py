"""``slerp``: spherical interpolation of two tensors (whole-tensor or per row), linear when nearly parallel."""

import math

import torch

from .. import _native, _validate
from .. import reference as ref
from .. import triton as _triton
from ..errors import ShapeError, WeightError
from ._engine import custom_op, empty_like, fake_like, run

OP = "slerp"


def _torch_impl(out, a, b, t, rowwise, dot_threshold, eps) -> None:
    out.copy_(ref.slerp(a, b, t, rowwise=rowwise, dot_threshold=dot_threshold, eps=eps))


def _cpu_impl(out, a, b, t, rowwise, dot_threshold, eps) -> None:
    rows = a.shape[0] if rowwise else 1
    cols = a.numel() // rows if rows else 0
    _native.lib().slerp(
        out.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        _native.dtype_code(a.dtype),
        rows,
        cols,
        t,
        dot_threshold,
        eps,
        _native.threads(),
    )


def _cpu_declines(a, *rest):
    return "float64 runs on 'torch'" if a.dtype == torch.float64 else None


_cpu_impl.declines = _cpu_declines

IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton.lazy("slerp")}


@custom_op("fusion_kernels::slerp", mutates_args=())
def _slerp(
    a: torch.Tensor, b: torch.Tensor, t: list[float], rowwise: bool, dot_threshold: float, eps: float
) -> torch.Tensor:
    out = empty_like(a)
    run(OP, IMPLS, out, a, b, t, rowwise, dot_threshold, eps)
    return out


@_slerp.register_fake
def _(a, b, t, rowwise, dot_threshold, eps):
    return fake_like(a)


@custom_op("fusion_kernels::slerp_out", mutates_args=("out",))
def _slerp_out(
    a: torch.Tensor,
    b: torch.Tensor,
    t: list[float],
    rowwise: bool,
    dot_threshold: float,
    eps: float,
    out: torch.Tensor,
) -> None:
    run(OP, IMPLS, out, a, b, t, rowwise, dot_threshold, eps)


@_slerp_out.register_fake
def _(a, b, t, rowwise, dot_threshold, eps, out):
    return None


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float | torch.Tensor,
    *,
    rowwise: bool = False,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spherical linear interpolation from ``a`` (t = 0) to ``b`` (t = 1); formula in
    :mod:`fusion_kernels.reference.slerp`.

    Args:
        a, b: same-shape, same-dtype float tensors.
        t: the factor; with ``rowwise`` also one per row (a 1-D tensor or list of ``a.shape[0]``).
        rowwise: interpolate each slice along dim 0 separately (mergekit 0.1.5's SLERP) instead of
            the whole tensor as one vector.
        dot_threshold: above this |cos θ| the inputs count as parallel and are interpolated linearly.
        eps: norms at or below it count as 1.
        out: optional tensor like ``a`` to write into; it may be ``a`` or ``b`` itself (the dot
            products are taken before any element is written).

    Example:
        >>> fk.slerp(model_a_weight, model_b_weight, 0.3)
    """
    op = OP
    a = _validate.check_tensor(op, "a", a)
    _validate.check_float(op, "a", a)
    _validate.check_like(op, "b", _validate.check_tensor(op, "b", b), a, "a")
    if rowwise and a.dim() == 0:
        raise ShapeError(f"{op}: argument 'a' expected at least 1 dim with rowwise=True, got a 0-dim tensor")
    rows = a.shape[0] if rowwise else 1
    if isinstance(t, torch.Tensor) and t.dim() == 1 or isinstance(t, (list, tuple)):
        ts = _validate.weight_list(op, "t", t, rows, default=0.5)
    else:
        ts = [_validate.finite_float(op, "t", t.item() if isinstance(t, torch.Tensor) else t)]
    threshold = _validate.finite_float(op, "dot_threshold", dot_threshold)
    eps = _validate.finite_float(op, "eps", eps)
    if not 0.0 <= threshold <= 1.0 or eps < 0 or math.isnan(eps):
        raise WeightError(f"{op}: expected 0 <= dot_threshold <= 1 and eps >= 0, got {threshold} and {eps}")
    if out is None:
        return _slerp(a, b, ts, rowwise, threshold, eps)
    _validate.check_out(op, out, a, "a", {"a": a, "b": b})
    _slerp_out(a, b, ts, rowwise, threshold, eps, out)
    return out
