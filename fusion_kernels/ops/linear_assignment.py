"""``linear_assignment``: exact minimum-cost (or maximum) assignment of rows to columns, one matrix
or a batch, with warm starts from the previous solve's column potentials."""

from __future__ import annotations

import math

import torch

from .. import _native, _validate
from .. import reference as ref
from .._dispatch import select
from ..errors import ShapeError, WeightError
from ._engine import custom_op

OP = "linear_assignment"


def _torch_impl(cost, maximize, potentials, warm):
    return ref.linear_assignment(cost, maximize), None


def _torch_declines(cost, maximize, potentials, warm):
    return "SciPy's solver returns no potentials" if potentials else None


def _cpu_impl(cost, maximize, potentials, warm):
    batch, n, m = cost.shape
    # float32/16 costs are read as float32 (exact), widened to float64 in the solver's registers
    work = cost.to(torch.float64 if cost.dtype == torch.float64 else torch.float32).contiguous()
    v = torch.zeros(batch, m, dtype=torch.float64) if warm is None else warm.to(torch.float64).clone().contiguous()
    perm = torch.empty(batch, n, dtype=torch.int64)
    _native.lib().linear_assignment(
        work.data_ptr(),
        work.dtype == torch.float32,
        bool(maximize),
        batch,
        n,
        m,
        warm is not None,
        v.data_ptr(),
        perm.data_ptr(),
        _native.threads(),
    )
    return perm, v


_torch_impl.declines = _torch_declines
_torch_impl.dtypes = _cpu_impl.dtypes = _validate.FLOAT_DTYPES
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl}


@custom_op("fusion_kernels::linear_assignment", mutates_args=())
def _linear_assignment(
    cost: torch.Tensor, maximize: bool, potentials: bool, warm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, n, m] CPU costs -> (perm [batch, n] int64, column potentials [batch, m] float64; NaN
    where the backend computes none). The solve runs on the CPU whatever device the caller's cost is on."""
    impl = select(OP, IMPLS, cost.device, cost.dtype, (cost, maximize, potentials, warm))
    perm, v = impl(cost, maximize, potentials, warm)
    if v is None:
        v = torch.full((cost.shape[0], cost.shape[2]), float("nan"), dtype=torch.float64)
    return perm, v


@_linear_assignment.register_fake
def _(cost, maximize, potentials, warm):
    batch, n, m = cost.shape
    return cost.new_empty(batch, n, dtype=torch.int64), cost.new_empty(batch, m, dtype=torch.float64)


def linear_assignment(
    cost: torch.Tensor,
    maximize: bool = False,
    *,
    warm_start: torch.Tensor | None = None,
    return_potentials: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """perm with perm[i] the column of row i in an assignment minimising Σᵢ cost[i, perm[i]]
    (maximising with ``maximize``); exact, like ``scipy.optimize.linear_sum_assignment``.

    The ``cpu`` backend solves by shortest augmenting paths in float64 arithmetic on the costs as
    they are stored (float32, float16 and bfloat16 read as float32: half the memory traffic, the
    same answer as their float64 copy); a batch is spread over the threads, a single matrix's row
    scans are split over them. The ``torch`` backend calls SciPy. Where several assignments are
    optimal, either may be returned.

    Args:
        cost: ``[..., n, m]`` finite floats with n <= m; leading dims are a batch.
        maximize: maximise the total instead.
        warm_start: column potentials ``[..., m]`` from an earlier call with ``return_potentials``
            on a similar square cost (coordinate descent's previous sweep): rows whose previous
            column is still best are assigned at once, and only the rest are searched.
        return_potentials: also return the column potentials (float64, ``[..., m]``; for the
            minimisation of ``-cost`` when maximising) to pass as the next ``warm_start``.

    Returns:
        int64 ``[..., n]`` on cost's device, or ``(perm, potentials)``.

    Example:
        >>> perm = fk.linear_assignment(similarity, maximize=True)  # weight matching
    """
    cost = _validate.check_tensor(OP, "cost", cost)
    _validate.check_float(OP, "cost", cost)
    if cost.dim() < 2 or cost.shape[-2] > cost.shape[-1]:
        raise ShapeError(f"{OP}: argument 'cost' expected shape [..., n, m] with n <= m, got {tuple(cost.shape)}")
    if not _validate.all_finite(cost):
        raise WeightError(f"{OP}: argument 'cost' has NaN or infinite entries")
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    batch = math.prod(batch_shape)
    if warm_start is not None:
        warm_start = _validate.check_tensor(OP, "warm_start", warm_start)
        _validate.check_float(OP, "warm_start", warm_start)
        if n != m:
            raise ShapeError(f"{OP}: argument 'warm_start' needs square costs, got {tuple(cost.shape)}")
        if warm_start.shape != (*batch_shape, m):
            raise ShapeError(
                f"{OP}: argument 'warm_start' expected shape {(*batch_shape, m)}, got {tuple(warm_start.shape)}"
            )
        if not _validate.all_finite(warm_start):
            raise WeightError(f"{OP}: argument 'warm_start' has NaN or infinite entries")
        warm_start = _shifted_potentials(warm_start.detach().to("cpu", torch.float64).reshape(batch, m), cost)
    flat = cost.detach().to("cpu").reshape(batch, n, m)
    perm, v = _linear_assignment(flat, bool(maximize), bool(return_potentials), warm_start)
    perm = perm.reshape(*batch_shape, n).to(cost.device)
    return (perm, v.reshape(*batch_shape, m)) if return_potentials else perm


def _shifted_potentials(v: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Column potentials less their minimum (an assignment's reduced costs do not change), refused
    where their spread dwarfs the cost's: cost − v would then round away the cost itself."""
    v = v - v.min(-1, keepdim=True).values
    cost_spread = 0.0
    if cost.numel():
        low, high = cost.detach().flatten(-2).aminmax(dim=-1)
        cost_spread = float((high.double() - low.double()).max())
    spread = float(v.max()) if v.numel() else 0.0
    if spread > 2.0**20 * max(cost_spread, 1e-300):
        raise WeightError(
            f"{OP}: argument 'warm_start' expected potentials of a similar cost (spread at most 2^20 × the "
            f"cost's {cost_spread:.3g}), got a spread of {spread:.3g}"
        )
    return v
