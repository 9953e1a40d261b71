"""``gram``: the float64 dot products of N tensors (or of their differences from a base), per row."""

import torch

from .. import _native, _validate
from .. import reference as ref
from .._dispatch import select
from ..errors import ShapeError
from ._engine import custom_op

OP = "gram"


def _torch_impl(xs, base, rows):
    return ref.gram(xs, base, rows)


def _cpu_impl(xs, base, rows):
    out = torch.empty(rows, len(xs), len(xs), dtype=torch.float64)
    cols = xs[0].numel() // rows if rows else 0
    _native.lib().gram(
        out.data_ptr(),
        [x.data_ptr() for x in xs],
        0 if base is None else base.data_ptr(),
        _native.dtype_code(xs[0].dtype),
        rows,
        cols,
        _native.threads(),
    )
    return out


IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::gram", mutates_args=())
def _gram(xs: list[torch.Tensor], base: torch.Tensor | None, rows: int) -> torch.Tensor:
    impl = select(OP, IMPLS, xs[0].device, xs[0].dtype, (xs, base, rows))
    xs = [x.contiguous() for x in xs]
    return impl(xs, None if base is None else base.contiguous(), rows)


@_gram.register_fake
def _(xs, base, rows):
    return xs[0].new_empty(rows, len(xs), len(xs), dtype=torch.float64)


def gram(xs, base: torch.Tensor | None = None, *, rows: int = 1) -> torch.Tensor:
    """G[r, i, j] = Σ_c (xᵢ − base)[r, c] · (xⱼ − base)[r, c] in float64, one read of every input;
    formula in :mod:`fusion_kernels.reference.gram`. Returns float64 ``[rows, N, N]``.

    Args:
        xs: N same-shape, same-dtype float tensors (a sequence or a stacked ``[N, ...]`` tensor).
        base: subtracted from each before the products (task vectors), or None.
        rows: the flat elements split into this many equal rows (1: the whole tensor as one vector;
            ``x.shape[0]``: per slice along dim 0). Must divide ``numel``.

    Example:
        >>> g = fk.gram([a, b], base)       # ‖a − base‖², (a − base)·(b − base), ‖b − base‖²
    """
    xs = _validate.tensor_list(OP, "xs", xs)
    _validate.check_float(OP, "xs[0]", xs[0])
    for i, x in enumerate(xs[1:], 1):
        _validate.check_like(OP, f"xs[{i}]", x, xs[0], "xs[0]")
    if base is not None:
        _validate.check_like(OP, "base", _validate.check_tensor(OP, "base", base), xs[0], "xs[0]")
    numel = xs[0].numel()
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1 or numel % rows:
        raise ShapeError(f"{OP}: argument 'rows' expected an int >= 1 dividing numel {numel}, got {rows!r}")
    return _gram(xs, base, rows)
