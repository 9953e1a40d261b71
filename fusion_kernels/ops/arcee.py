"""``arcee_importance`` and ``arcee_select``: arcee_fusion's per-element importance, |x − base| times
the KL divergence of the softmaxes of each last-dim vector (one fused pass per row), and its merge
once the cut is known."""

import torch

from .. import _native, _validate
from .._dispatch import select
from ..errors import DTypeError, ShapeError, WeightError
from ..reference import composite
from ..reference.weighted_sum import accumulation_dtype
from ._engine import custom_op, empty_like, fake_like, run

OP = "arcee_importance"
EPS = 1e-8  # mergekit's, added to both softmaxes


def _torch_impl(base, x):
    return composite.arcee_importance(base, x)


def _cpu_impl(base, x, out=None):
    if out is None:
        out = torch.empty(base.shape, dtype=accumulation_dtype(base.dtype))
        _native.advise_hugepages(out)
    if base.numel() == 0:
        return out
    cols = base.shape[-1] if base.dim() else 1
    rows = base.numel() // cols
    skipped = _native.lib().arcee_importance(
        out.data_ptr(),
        base.data_ptr(),
        x.data_ptr(),
        _native.dtype_code(base.dtype),
        rows,
        cols,
        EPS,
        _native.threads(),
    )
    if skipped:  # rows holding inf or NaN: the reference's values (its NaN and -inf handling)
        out.copy_(composite.arcee_importance(base, x))
    return out


def _torch_out_impl(base, x, out):
    out.copy_(composite.arcee_importance(base, x))


IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::arcee_importance", mutates_args=())
def _arcee_importance(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    impl = select(OP, IMPLS, base.device, base.dtype, (base, x))
    return impl(base.contiguous(), x.contiguous())


@_arcee_importance.register_fake
def _(base, x):
    return base.new_empty(base.shape, dtype=accumulation_dtype(base.dtype))


OUT_IMPLS = {"torch": _torch_out_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::arcee_importance_out", mutates_args=("out",))
def _arcee_importance_out(base: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    select(OP, OUT_IMPLS, base.device, base.dtype, (base, x))(base.contiguous(), x.contiguous(), out)


@_arcee_importance_out.register_fake
def _(base, x, out):
    return None


def arcee_importance(base: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """arcee_fusion's importance of each element of ``x`` over ``base`` (mergekit's formula), per
    vector along the last dim, in float32 (float64 for float64 inputs)::

        p = softmax(x) + 1e-8,  q = softmax(base) + 1e-8,  KL = Σ p·ln(p / q)
        importance = |x − base| · KL

    The result is float32 (float64) and shaped like ``base``. A vector holding inf or NaN gets the
    reference's value. ``out``: an optional contiguous tensor of that dtype and shape to write into
    (a reused buffer spares the page faults of a fresh one). Example:

        >>> imp = fk.arcee_importance(base_weight, tuned_weight)
    """
    base = _validate.check_tensor(OP, "base", base)
    _validate.check_float(OP, "base", base)
    _validate.check_like(OP, "x", _validate.check_tensor(OP, "x", x), base, "base")
    if out is None:
        return _arcee_importance(base, x)
    _check_importance(OP, "out", out, base)
    if not out.is_contiguous():
        raise ShapeError(f"{OP}: argument 'out' expected a contiguous tensor, got strides {tuple(out.stride())}")
    _validate.check_overlap(OP, out, {"base": base, "x": x}, may_alias=False)
    _arcee_importance_out(base, x, out)
    return out


def _check_importance(op: str, name: str, importance: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``importance`` must be a tensor shaped like ``base``, on its device, in its accumulation dtype."""
    importance = _validate.check_tensor(op, name, importance)
    wide = accumulation_dtype(base.dtype)
    if importance.dtype != wide:
        raise DTypeError(f"{op}: argument '{name}' expected dtype {wide}, got {importance.dtype}")
    if importance.shape != base.shape or importance.device != base.device:
        raise ShapeError(
            f"{op}: argument '{name}' expected shape {tuple(base.shape)} on {base.device}, "
            f"got {tuple(importance.shape)} on {importance.device}"
        )
    return importance


def _select_torch(out, base, x, importance, cut):
    out.copy_(composite.arcee_select(base, x, importance, cut))


def _select_cpu(out, base, x, importance, cut):
    _native.lib().arcee_select(
        out.data_ptr(),
        base.data_ptr(),
        x.data_ptr(),
        importance.data_ptr(),
        cut,
        out.numel(),
        _native.dtype_code(out.dtype),
        _native.threads(),
    )


SELECT_IMPLS = {"torch": _select_torch, "cpu": _select_cpu}


@custom_op("fusion_kernels::arcee_select", mutates_args=())
def _arcee_select(base: torch.Tensor, x: torch.Tensor, importance: torch.Tensor, cut: float) -> torch.Tensor:
    out = empty_like(base)
    run("arcee_select", SELECT_IMPLS, out, base, x, importance, cut)
    return out


@_arcee_select.register_fake
def _(base, x, importance, cut):
    return fake_like(base)


@custom_op("fusion_kernels::arcee_select_out", mutates_args=("out",))
def _arcee_select_out(
    base: torch.Tensor, x: torch.Tensor, importance: torch.Tensor, cut: float, out: torch.Tensor
) -> None:
    run("arcee_select", SELECT_IMPLS, out, base, x, importance, cut)


@_arcee_select_out.register_fake
def _(base, x, importance, cut, out):
    return None


def arcee_select(
    base: torch.Tensor, x: torch.Tensor, importance: torch.Tensor, cut: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """arcee_fusion's merge once the cut is known: ``x`` where ``importance >= cut`` (compared in the
    importance's dtype), else ``base``; the chosen elements copied bit for bit.

    Args:
        base, x: like tensors.
        importance: shaped like them, float32 (float64 for float64 inputs), as :func:`arcee_importance` returns.
        cut: a float; mergekit's is median + 1.5·IQR of the importance.
        out: optional tensor like ``base`` to write into; it may be ``base`` or ``x`` itself.
    """
    op = "arcee_select"
    base = _validate.check_tensor(op, "base", base)
    _validate.check_float(op, "base", base)
    _validate.check_like(op, "x", _validate.check_tensor(op, "x", x), base, "base")
    importance = _check_importance(op, "importance", importance, base)
    if not isinstance(cut, (int, float)) or isinstance(cut, bool):
        raise WeightError(f"{op}: argument 'cut' expected a float, got {cut!r}")
    if out is None:
        return _arcee_select(base, x, importance, float(cut))
    _validate.check_out(op, out, base, "base", {"base": base, "x": x, "importance": importance})
    _arcee_select_out(base, x, importance, float(cut), out)
    return out
