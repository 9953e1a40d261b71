"""``magnitude_threshold`` and ``magnitude_prune``: exact top-k by magnitude, deterministic ties."""

import torch

from .. import _sparse_native, _validate
from .. import reference as ref
from .. import triton as _triton
from ..errors import WeightError
from ._engine import custom_op, empty_like, fake_like, run

OP = "magnitude_prune"


def _torch_prune(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(ref.magnitude_prune(x, k))


def _cpu_prune(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    _sparse_native.sparse_merge(
        out, None, [x], [1.0], "magnitude", None, None, "weighted", "sum", [1.0], [0.0], [0.0], 1.0, 0, [], ks=[k]
    )


def _cpu_declines(x, k):
    return _sparse_native.sparse_declines([x], "magnitude", None, [])


def _torch_threshold(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(ref.magnitude_threshold(x, k))


def _cpu_threshold(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    out.copy_(_sparse_native.threshold_value(x, k))


_cpu_prune.declines = _cpu_threshold.declines = _cpu_declines

IMPLS = {"torch": _torch_prune, "cpu": _cpu_prune, "triton": _triton.lazy("sparse_merge", "magnitude_prune")}
THRESHOLD_IMPLS = {
    "torch": _torch_threshold,
    "cpu": _cpu_threshold,
    "triton": _triton.lazy("sparse_merge", "magnitude_threshold"),
}


@custom_op("fusion_kernels::magnitude_prune", mutates_args=())
def _magnitude_prune(x: torch.Tensor, k: int) -> torch.Tensor:
    out = empty_like(x)
    run(OP, IMPLS, out, x, k)
    return out


@_magnitude_prune.register_fake
def _(x, k):
    return fake_like(x)


@custom_op("fusion_kernels::magnitude_threshold", mutates_args=())
def _magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty((), dtype=x.dtype, device=x.device)
    run("magnitude_threshold", THRESHOLD_IMPLS, out, x, k)
    return out


@_magnitude_threshold.register_fake
def _(x, k):
    return x.new_empty(())


def _k(op: str, x: torch.Tensor, density: float | None, k: int | None) -> int:
    if (density is None) == (k is None):
        raise WeightError(f"{op}: pass exactly one of 'density' and 'k', got density={density!r}, k={k!r}")
    if k is None:
        density = _validate.per_model(op, "density", density, 1, 0.0, 1.0)[0]
        return int(density * x.numel())
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= x.numel():
        raise WeightError(f"{op}: argument 'k' expected an int in [0, {x.numel()}], got {k!r}")
    return k


def _input(op: str, x: object) -> torch.Tensor:
    x = _validate.check_tensor(op, "x", x)
    _validate.check_float(op, "x", x)
    return x


def magnitude_prune(x: torch.Tensor, density: float | None = None, *, k: int | None = None) -> torch.Tensor:
    """``x`` with all but its k largest |x| zeroed; k = ⌊density·numel⌋ or given.

    Exactly k elements survive: among equal magnitudes at the threshold, the lowest flat indices
    are kept (NaN ranks above inf). ``x`` is never modified.
    """
    x = _input("magnitude_prune", x)
    return _magnitude_prune(x, _k("magnitude_prune", x, density, k))


def magnitude_threshold(x: torch.Tensor, density: float | None = None, *, k: int | None = None) -> torch.Tensor:
    """The k-th largest |x| as a 0-dim tensor of x's dtype (k = ⌊density·numel⌋ or given, k ≥ 1)."""
    x = _input("magnitude_threshold", x)
    k = _k("magnitude_threshold", x, density, k)
    if k < 1:
        raise WeightError(f"magnitude_threshold: needs k >= 1 (a non-empty x and density >= 1/numel), got k={k}")
    return _magnitude_threshold(x, k)
