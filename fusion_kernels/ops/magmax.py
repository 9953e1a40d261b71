"""``magmax``: MagMax in one pass (the task vector of largest magnitude per element)."""

from collections.abc import Sequence

import torch

from .. import _native, _validate
from .. import reference as ref
from ._engine import custom_op, empty_like, fake_like, native_kernels, run

OP = "magmax"


def _torch_impl(out, base: torch.Tensor, xs: list[torch.Tensor], lam: float) -> None:
    out.copy_(ref.magmax(base, xs, lam))


_cpu_impl, _ = native_kernels("magmax", lambda base, xs, lam: (base.data_ptr(), _native.pointers(xs), [lam] * len(xs)))
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::magmax", mutates_args=())
def _magmax(base: torch.Tensor, xs: list[torch.Tensor], lam: float) -> torch.Tensor:
    out = empty_like(base)
    run(OP, IMPLS, out, base, xs, lam)
    return out


@_magmax.register_fake
def _(base, xs, lam):
    return fake_like(base)


@custom_op("fusion_kernels::magmax_out", mutates_args=("out",))
def _magmax_out(base: torch.Tensor, xs: list[torch.Tensor], lam: float, out: torch.Tensor) -> None:
    run(OP, IMPLS, out, base, xs, lam)


@_magmax_out.register_fake
def _(base, xs, lam, out):
    return None


def magmax(
    base: torch.Tensor, xs: Sequence[torch.Tensor] | torch.Tensor, lam: float = 1.0, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """MagMax (Marczak et al., 2024), one pass, float32 arithmetic (float64 for float64)::

        out = base + λ·τ*,  τ* = per element the τᵢ = xᵢ − base of largest |τᵢ| (a later model wins a tie)

    Args:
        base: the pre-trained tensor.
        xs: N fine-tuned tensors like ``base`` (or one stacked ``[N, *shape]``).
        lam: λ, FusionBench's ``scaling_factor``.
        out: optional tensor like ``base`` to write into; it may be ``base`` or one of ``xs``.

    Example:
        >>> fk.magmax(pretrained, [ft_a, ft_b, ft_c], lam=0.5)
    """
    base = _validate.check_tensor(OP, "base", base)
    _validate.check_float(OP, "base", base)
    xs = _validate.tensor_list(OP, "xs", xs)
    _validate.inputs_like(OP, "xs", xs, base, "base")
    lam = _validate.finite_float(OP, "lam", lam)
    if out is None:
        return _magmax(base, xs, lam)
    _validate.check_out(OP, out, base, "base", {"base": base, **{f"xs[{i}]": x for i, x in enumerate(xs)}})
    _magmax_out(base, xs, lam, out)
    return out
