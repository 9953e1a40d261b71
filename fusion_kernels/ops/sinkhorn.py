"""``sinkhorn``: batched log-domain entropic optimal transport (and the Sinkhorn operator), with an
implicit or unrolled backward."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .. import _native, _validate
from .. import reference as ref
from .. import triton as _triton
from .._dispatch import select
from ..errors import ArgumentTypeError, ShapeError, WeightError
from ._engine import custom_op

OP = "sinkhorn"


class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn` returns; leading (batch) dims as in ``cost``."""

    plan: torch.Tensor  # [..., n, m]: P, or log P with log=True; dtype of cost
    f: torch.Tensor  # [..., n]: row potentials, P_ij = exp((f_i + g_j − C_ij)/reg)
    g: torch.Tensor  # [..., m]: column potentials
    iterations: torch.Tensor  # [...] int64: f/g iterations each matrix ran
    error: torch.Tensor  # [...] float64: Σ_i |Σ_j P_ij − a_i| of the returned plan (column sums are exact)


def _torch_impl(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan):
    return ref.sinkhorn(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan)


def _cpu_impl(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan):
    batch, n, m = cost.shape
    plan, f, g = torch.empty_like(cost), cost.new_empty(batch, n), cost.new_empty(batch, m)
    iterations = torch.empty(batch, dtype=torch.int64)
    error = torch.empty(batch, dtype=torch.float64)
    _native.lib().sinkhorn(
        *(t.data_ptr() for t in (cost, log_a, log_b, plan, f, g, iterations, error)),
        _native.dtype_code(cost.dtype),
        batch,
        n,
        m,
        reg,
        max_iter,
        tol,
        check_every,
        log_plan,
        _native.threads(),
    )
    return plan, f, g, iterations, error


_triton_impl = _triton.lazy("sinkhorn")
_torch_impl.dtypes = _cpu_impl.dtypes = (torch.float32, torch.float64)
_triton_impl.dtypes = (torch.float32,)
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton_impl}


@custom_op("fusion_kernels::sinkhorn", mutates_args=())
def _sinkhorn(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    reg: float,
    max_iter: int,
    tol: float,
    check_every: int,
    log_plan: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select(OP, IMPLS, cost.device, cost.dtype)
    with torch.no_grad():
        return tuple(t.contiguous() for t in impl(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan))


@_sinkhorn.register_fake
def _(cost, log_a, log_b, reg, max_iter, tol, check_every, log_plan):
    batch, n, m = cost.shape
    return (
        torch.empty_like(cost),
        cost.new_empty(batch, n),
        cost.new_empty(batch, m),
        cost.new_empty(batch, dtype=torch.int64),
        cost.new_empty(batch, dtype=torch.float64),
    )


def _setup_context(ctx, inputs, output):
    ctx.reg, ctx.log_plan = inputs[3], inputs[7]
    ctx.save_for_backward(output[0])


def _backward(ctx, grad_plan, grad_f, grad_g, _grad_iterations, _grad_error):
    (plan,) = ctx.saved_tensors
    p = plan.exp() if ctx.log_plan else plan
    q = _zeros_if_none(grad_plan, p) * (1.0 if ctx.log_plan else p) / ctx.reg
    grad_cost = implicit_grad(p, q, _zeros_if_none(grad_f, p[..., 0]), _zeros_if_none(grad_g, p[..., 0, :]))
    return grad_cost, None, None, None, None, None, None, None


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def implicit_grad(p: torch.Tensor, q: torch.Tensor, grad_f: torch.Tensor, grad_g: torch.Tensor) -> torch.Tensor:
    """dL/dC from the optimality conditions of a converged plan P (implicit function theorem).

    With Q = (dL/dP)∘P/ε, r = [Q·1 + dL/df; Qᵀ·1 + dL/dg] and H = [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]],
    solve H [u; v] = r (H is singular along (1, −1), the potentials' shift; r is projected off it)
    and dL/dC_ij = P_ij·(u_i + v_j) − Q_ij. The smaller side is solved by its Schur complement, in
    float64; the [n, m] products stay in P's dtype.
    """
    r1 = q.sum(-1, dtype=torch.float64) + grad_f.double()
    r2 = q.sum(-2, dtype=torch.float64) + grad_g.double()
    n, m = p.shape[-2], p.shape[-1]
    shift = (r1.sum(-1, keepdim=True) - r2.sum(-1, keepdim=True)) / (n + m)
    r1, r2 = r1 - shift, r2 + shift
    if m > n:  # eliminate v instead: the same equations with P transposed
        v, u = _schur_solve(p.transpose(-1, -2), r2, r1)
    else:
        u, v = _schur_solve(p, r1, r2)
    return p * (u.unsqueeze(-1) + v.unsqueeze(-2)).to(p.dtype) - q


def _schur_solve(p, r1, r2):
    """Solves [[diag(a), P], [Pᵀ, diag(b)]] [u; v] = [r1; r2] (a, b: P's row and column sums) via the
    m×m Schur complement S = diag(b) − Pᵀ diag(1/a) P, made definite by adding 11ᵀ (S1 = 0 and the
    right side sums to zero, so the solution is unchanged)."""
    a, b = p.sum(-1, dtype=torch.float64), p.sum(-2, dtype=torch.float64)
    pa = p / a.unsqueeze(-1).to(p.dtype)
    s = torch.diag_embed(b) - (p.transpose(-1, -2) @ pa).double() + 1.0
    rhs = r2 - (pa.transpose(-1, -2) @ r1.to(p.dtype).unsqueeze(-1)).squeeze(-1).double()
    del pa
    v = torch.linalg.solve(s, rhs.unsqueeze(-1)).squeeze(-1)
    u = (r1 - (p @ v.to(p.dtype).unsqueeze(-1)).squeeze(-1).double()) / a
    return u, v


_sinkhorn.register_autograd(_backward, setup_context=_setup_context)


def _marginal(name: str, value, size: int, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """log of a marginal, broadcast to [*batch_shape, size] in the compute dtype."""
    if value is None:
        return torch.full((*batch_shape, size), -math.log(size), dtype=like.dtype, device=like.device)
    value = _validate.check_tensor(OP, name, value)
    _validate.check_float(OP, name, value)
    if value.shape[-1:] != (size,):
        raise ShapeError(f"{OP}: argument '{name}' expected shape [..., {size}], got {tuple(value.shape)}")
    try:
        value = value.to(like.device, like.dtype).expand(*batch_shape, size)
    except RuntimeError:
        raise ShapeError(
            f"{OP}: argument '{name}' of shape {tuple(value.shape)} does not broadcast to "
            f"{(*batch_shape, size)} (the batch dims of cost)"
        ) from None
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise WeightError(f"{OP}: argument '{name}' expected finite, strictly positive masses")
    return value.detach().log().contiguous()


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ArgumentTypeError(f"{OP}: argument '{name}' expected an int >= 1, got {value!r}")
    return int(value)


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float,
    max_iter: int = 1000,
    tol: float | None = 1e-6,
    check_every: int = 10,
    log: bool = False,
    backward: str = "implicit",
) -> SinkhornResult:
    """Entropic OT plan between marginals ``a`` and ``b`` for ``cost``, by log-domain Sinkhorn
    iterations (formula and stopping rule: :mod:`fusion_kernels.reference.sinkhorn`).

    P = argmin_{P1 = a, Pᵀ1 = b} ⟨P, C⟩ − reg·H(P). The Sinkhorn operator of Sinkhorn re-basin,
    which makes exp(−C/reg) doubly stochastic, is ``sinkhorn(C, ones(n), ones(n), reg=reg)``.
    Stable for small reg (log domain throughout). Runs in float32 (float64 for float64 costs);
    the plan and potentials come back in the cost's dtype.

    Args:
        cost: ``[..., n, m]`` finite float costs; leading dims are a batch, each matrix iterates
            until its own error is at most ``tol``.
        a, b: positive masses ``[..., n]`` and ``[..., m]`` (broadcast over the batch) with equal
            sums; None means uniform 1/n and 1/m.
        reg: the entropic regularisation ε > 0.
        max_iter: most f/g iterations; tol: stop at this row-marginal L1 error, checked every
            ``check_every`` iterations (None: never stop early, run exactly max_iter).
        log: return log P instead of P (exact where P underflows).
        backward: how gradients reach ``cost`` (from plan, f and g): ``"implicit"`` (default:
            the implicit function theorem at the returned plan, one m×m solve per matrix with
            m the smaller side, memory O(n·m); exact at convergence) or ``"unrolled"`` (autograd
            through the plain PyTorch loop; memory grows with the iterations).

    Returns:
        :class:`SinkhornResult` (plan, f, g, iterations, error).
    """
    cost = _validate.check_tensor(OP, "cost", cost)
    _validate.check_float(OP, "cost", cost)
    if cost.dim() < 2 or cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ShapeError(f"{OP}: argument 'cost' expected shape [..., n, m] with n, m >= 1, got {tuple(cost.shape)}")
    reg = _validate.finite_float(OP, "reg", reg)
    # A negative tolerance is below every error: the loop runs max_iter.
    tol = -1.0 if tol is None else _validate.finite_float(OP, "tol", tol)
    if reg <= 0 or tol < 0 and tol != -1.0:
        raise WeightError(f"{OP}: expected reg > 0 and tol >= 0, got reg={reg} and tol={tol}")
    max_iter, check_every = _positive_int("max_iter", max_iter), _positive_int("check_every", check_every)
    _validate.choice(OP, "backward", backward, ("implicit", "unrolled"))
    if not _validate.all_finite(cost):
        raise WeightError(f"{OP}: argument 'cost' has NaN or infinite entries")
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    # P = exp((f + g − C)/reg) carries an absolute error of about max|C|/reg · ε in its exponent: past
    # 2^16 that is 0.4% in float32 (a plan reported converged would be far off its marginals), so
    # such costs run in float64; past 2^36 float64 is no better than a 1e-5 tolerance, so they are refused
    spread = float(cost.detach().abs().max()) / reg
    if spread > 2.0**36:
        raise WeightError(
            f"{OP}: argument 'cost' expected max|cost| / reg <= 2^36, got {spread:.3g}: scale the cost "
            "down or raise reg (for reg → 0, linear_assignment solves the limit exactly)"
        )
    work = cost.to(torch.float64 if cost.dtype == torch.float64 or spread > 2.0**16 else torch.float32)
    log_a = _marginal("a", a, n, batch_shape, work)
    log_b = _marginal("b", b, m, batch_shape, work)
    if log_a.numel():
        mass_a, mass_b = log_a.double().exp().sum(-1), log_b.double().exp().sum(-1)
        if not bool(torch.allclose(mass_a, mass_b, rtol=1e-5, atol=0)):
            raise WeightError(
                f"{OP}: arguments 'a' and 'b' expected equal total mass, got {mass_a.flatten()[0].item():.6g} "
                f"and {mass_b.flatten()[0].item():.6g}"
            )
    args = (
        work.reshape(-1, n, m).contiguous(),
        log_a.reshape(-1, n),
        log_b.reshape(-1, m),
        reg,
        max_iter,
        tol,
        check_every,
        bool(log),
    )
    if backward == "unrolled" and torch.is_grad_enabled() and cost.requires_grad:
        plan, f, g, iterations, error = ref.sinkhorn(*args)
    else:
        plan, f, g, iterations, error = _sinkhorn(*args)
    # a plan with an overflow is never reported as converged
    overflow = (plan.isnan() | (plan == float("inf"))) if log else ~torch.isfinite(plan)
    bad = overflow.flatten(-2).any(-1) | ~torch.isfinite(f).all(-1) | ~torch.isfinite(g).all(-1)
    error = torch.where(bad.to(error.device), torch.full_like(error, float("inf")), error)
    return SinkhornResult(
        plan.reshape(cost.shape).to(cost.dtype),
        f.reshape(*batch_shape, n).to(cost.dtype),
        g.reshape(*batch_shape, m).to(cost.dtype),
        iterations.reshape(batch_shape),
        error.reshape(batch_shape),
    )
