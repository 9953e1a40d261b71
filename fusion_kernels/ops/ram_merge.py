"""``ram_merge`` and ``ram_counts``: Reinforced Agent Merging (RAM, RAM+) in one pass each."""

import math
from collections.abc import Sequence

import torch

from .. import _native, _validate
from .._dispatch import select
from ..errors import WeightError
from ..reference import composite
from ._engine import custom_op, empty_like, fake_like, native_kernels, run

OP = "ram_merge"


def _torch_impl(out, base: torch.Tensor, xs: list[torch.Tensor], scales: list[float], epsilon: float) -> None:
    out.copy_(composite.ram(base, xs, epsilon, scales=scales))


_cpu_impl, _ = native_kernels(
    "ram_merge", lambda base, xs, scales, epsilon: (base.data_ptr(), _native.pointers(xs), scales, epsilon)
)
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::ram_merge", mutates_args=())
def _ram_merge(base: torch.Tensor, xs: list[torch.Tensor], scales: list[float], epsilon: float) -> torch.Tensor:
    out = empty_like(base)
    run(OP, IMPLS, out, base, xs, scales, epsilon)
    return out


@_ram_merge.register_fake
def _(base, xs, scales, epsilon):
    return fake_like(base)


@custom_op("fusion_kernels::ram_merge_out", mutates_args=("out",))
def _ram_merge_out(
    base: torch.Tensor, xs: list[torch.Tensor], scales: list[float], epsilon: float, out: torch.Tensor
) -> None:
    run(OP, IMPLS, out, base, xs, scales, epsilon)


@_ram_merge_out.register_fake
def _(base, xs, scales, epsilon, out):
    return None


def _counts_torch(base, xs, epsilon):
    return [n for pair in composite.ram_counts(base, xs, epsilon) for n in pair]


def _counts_cpu(base, xs, epsilon):
    numel, code = base.numel(), _native.dtype_code(base.dtype)
    return _native.lib().ram_counts(base.data_ptr(), _native.pointers(xs), epsilon, numel, code, _native.threads())


COUNT_IMPLS = {"torch": _counts_torch, "cpu": _counts_cpu}


def _check(op: str, base, xs, epsilon) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    base = _validate.check_tensor(op, "base", base)
    _validate.check_float(op, "base", base)
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.inputs_like(op, "xs", xs, base, "base")
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon < 0:
        raise WeightError(f"{op}: argument 'epsilon' expected a finite float >= 0, got {epsilon!r}")
    return base, xs, float(epsilon)


def ram_merge(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor] | torch.Tensor,
    epsilon: float,
    scales: Sequence[float] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reinforced Agent Merging (mergekit's ``ram``; with ``scales``, ``ramplus_tl``), one pass,
    float32 arithmetic (float64 for float64 inputs), rounded once::

        τᵢ = xᵢ − base, kept where |τᵢ| > epsilon, c = number of models keeping an element
        out = base + Σ kept τᵢ / max(c, 1)      where c ≠ 1
        out = base + λᵢ·τᵢ                      where only model i keeps it (λᵢ = scales[i])

    Args:
        base: the pre-trained tensor.
        xs: N fine-tuned tensors like ``base`` (or one stacked ``[N, *shape]``).
        epsilon: the keep threshold on |τᵢ| (≥ 0).
        scales: N factors λᵢ for the elements only one model keeps (None: 1 each, plain RAM);
            RAM+ computes them from :func:`ram_counts`.
        out: optional tensor like ``base`` to write into; it may be one of the inputs itself.

    Example:
        >>> fk.ram_merge(base, [math_ft, code_ft], epsilon=1e-5)
    """
    base, xs, epsilon = _check(OP, base, xs, epsilon)
    lam = _validate.weight_list(OP, "scales", scales, len(xs), default=1.0)
    if out is None:
        return _ram_merge(base, xs, lam, epsilon)
    _validate.check_out(OP, out, base, "base", {"base": base, **{f"xs[{i}]": x for i, x in enumerate(xs)}})
    _ram_merge_out(base, xs, lam, epsilon, out)
    return out


def ram_counts(base: torch.Tensor, xs: Sequence[torch.Tensor] | torch.Tensor, epsilon: float) -> list[tuple[int, int]]:
    """Per model i: (elements it keeps — |τᵢ| > epsilon — that another model keeps too, elements
    only it keeps), counted in one pass; RAM+'s ρᵢ is their ratio. Returns N pairs of ints."""
    op = "ram_counts"
    base, xs, epsilon = _check(op, base, xs, epsilon)
    impl = select(op, COUNT_IMPLS, base.device, base.dtype, (base, xs, epsilon))
    flat = impl(base.contiguous(), [x.contiguous() for x in xs], epsilon)
    return [(int(flat[2 * i]), int(flat[2 * i + 1])) for i in range(len(xs))]
