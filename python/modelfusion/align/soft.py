"""Alignment by learned or transported soft permutations: Sinkhorn re-basin (Peña et al., 2023),
the straight-through estimator (Ainsworth et al., 2023) and OT fusion (Singh & Jaggi, 2020).

For plain specs (no attention head groups). A soft permutation is a doubly stochastic n×n matrix
S; it acts on a tensor's axis as S·W along that axis (a hard permutation P is the 0/1 case, the
same as ``apply_perms``). Sinkhorn re-basin learns logits M per permutation, S = n·sinkhorn(−M/τ)
with uniform marginals (the engine's ``fusion_kernels.sinkhorn``, differentiable), against one of

    "l2":       Σ ‖W_A − S(W_B)‖²
    "midpoint": the task loss of ½(θ_A + S(θ_B)) on data
    "random":   the task loss of (1 − t)·θ_A + t·S(θ_B), t ~ U(0, 1) per step

and rounds each S to the nearest permutation with ``fusion_kernels.linear_assignment``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

import fusion_kernels as fk

from ..errors import ParameterError
from .matching import unit_matrix, weight_matching
from .spec import Perms, PermutationSpec, apply_perms

OBJECTIVES = ("l2", "midpoint", "random")


def _plain(spec: PermutationSpec, what: str) -> None:
    if spec.heads:
        raise ParameterError(f"{what}: takes specs without attention head groups (use weight_matching for those)")


def soft_apply(spec: PermutationSpec, soft: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict:
    """``state`` with every permuted axis multiplied by its soft permutation (row i = Σⱼ S[i, j]·unit j)."""
    out = dict(state)
    for key, axes in spec.by_tensor().items():
        w = state[key].float()
        for axis, p in axes.items():
            moved = w.movedim(axis, 0)
            w = (soft[p] @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, axis)
        out[key] = w
    return out


def hard_round(soft: Mapping[str, torch.Tensor]) -> Perms:
    """The permutation closest to each soft one: argmax_P ⟨P, S⟩ (a valid permutation always)."""
    return {p: fk.linear_assignment(s.detach(), maximize=True) for p, s in soft.items()}


SINKHORN_ITERATIONS = 20


def _sinkhorn_operator(scores: torch.Tensor) -> torch.Tensor:
    """The Sinkhorn operator of ``scores`` (rows and columns summing to 1/n): a fixed number of
    iterations, differentiated by unrolling. The implicit backward needs a non-degenerate plan,
    and learned plans approach permutations, where it becomes singular."""
    return fk.sinkhorn(-scores, reg=1.0, max_iter=SINKHORN_ITERATIONS, tol=None, backward="unrolled").plan


def sinkhorn_rebasin(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    objective: str = "l2",
    template: nn.Module | None = None,
    data: Iterable | None = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    steps: int = 200,
    lr: float = 0.1,
    tau: float = 1.0,
    init: Perms | None = None,
    seed: int = 0,
) -> Perms:
    """Learned soft permutations, rounded. ``init`` (e.g. weight matching's) starts the logits at
    that permutation; "midpoint" and "random" need ``template`` (a module of A's architecture) and
    ``data`` (``(inputs, targets)`` batches, cycled)."""
    _plain(spec, "sinkhorn_rebasin")
    if objective not in OBJECTIVES:
        raise ParameterError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if objective != "l2" and (template is None or data is None):
        raise ParameterError(f"objective {objective!r}: needs template= and data=")
    if tau <= 0:
        raise ParameterError(f"tau: expected a positive temperature, got {tau!r}")
    sizes = spec.sizes(state_a)
    logits = {}
    for p, n in sizes.items():
        m = torch.zeros(n, n)
        if init is not None:
            m[torch.arange(n), init[p]] = 1.0
        logits[p] = m.requires_grad_(True)
    opt = torch.optim.Adam(logits.values(), lr=lr)
    a = {k: v.float() for k, v in state_a.items()}
    b = {k: v.float() for k, v in state_b.items()}
    batches = list(data) if data is not None else []
    g = torch.Generator().manual_seed(seed)
    scale = sum(float(v.pow(2).sum()) for v in a.values() if v.is_floating_point()) or 1.0
    for step in range(steps):
        soft = {p: n * _sinkhorn_operator(logits[p] / tau) for p, n in sizes.items()}
        aligned = soft_apply(spec, soft, b)
        if objective == "l2":
            loss = sum((a[k] - aligned[k]).pow(2).sum() for k in spec.by_tensor()) / scale
        else:
            t = 0.5 if objective == "midpoint" else float(torch.rand((), generator=g))
            params = {k: (1 - t) * a[k] + t * aligned[k] if a[k].is_floating_point() else a[k] for k in a}
            x, y = batches[step % len(batches)]
            loss = loss_fn(functional_call(template, params, (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        soft = {p: _sinkhorn_operator(logits[p] / tau) for p in sizes}
    return hard_round(soft)


def ste_matching(
    spec: PermutationSpec,
    template: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    data: Iterable,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    loss_fn: Callable = nn.functional.cross_entropy,
) -> Perms:
    """Straight-through estimator: free weights θ̃ (from B weight-matched to A) are trained so that
    the midpoint of A and B permuted to match θ̃ has a low loss; the forward pass uses the permuted
    B, the gradient flows to θ̃. Returns the permutation matching θ̃ at the end."""
    _plain(spec, "ste_matching")
    batches = list(data)
    perms = weight_matching(spec, state_a, state_b).perms
    free = {
        k: v.float().clone().requires_grad_(v.is_floating_point()) for k, v in apply_perms(spec, perms, state_b).items()
    }
    opt = torch.optim.Adam([v for v in free.values() if v.requires_grad], lr=lr)
    for step in range(steps):
        projected = apply_perms(spec, perms, state_b)
        params = {
            k: 0.5 * (state_a[k].float() + projected[k].float() + v - v.detach()) if v.requires_grad else state_a[k]
            for k, v in free.items()
        }
        x, y = batches[step % len(batches)]
        loss = loss_fn(functional_call(template, params, (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        perms = weight_matching(spec, {k: v.detach() for k, v in free.items()}, state_b, init=perms).perms
    return perms


def ot_transport(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    order: list[str] | None = None,
    reg: float | None = None,
) -> dict[str, torch.Tensor]:
    """T(B) of OT fusion: permutation by permutation in network ``order`` (default: the spec's),
    B's units are transported onto A's by the squared distance of their vectors (B's earlier axes
    already transported), exactly (``reg=None``: a permutation) or entropically (``reg``: n·plan of
    ``fusion_kernels.sinkhorn`` with uniform marginals)."""
    _plain(spec, "ot_transport")
    sizes = spec.sizes(state_a)
    order = list(spec.axes) if order is None else order
    if sorted(order) != sorted(spec.axes):
        raise ParameterError(f"order: expected the spec's permutations {sorted(spec.axes)}, got {order}")
    transport: dict[str, torch.Tensor] = {}
    identity = {p: torch.eye(n) for p, n in sizes.items()}
    for p in order:
        current = {**identity, **transport}
        moved = soft_apply(spec, {q: current[q] for q in spec.axes if q != p} | {p: identity[p]}, state_b)
        rows_a = torch.cat([unit_matrix(state_a[k].float(), ax) for k, ax in spec.axes[p]], 1)
        rows_b = torch.cat([unit_matrix(moved[k].float(), ax) for k, ax in spec.axes[p]], 1)
        cost = torch.cdist(rows_a.double(), rows_b.double()).pow(2)
        n = sizes[p]
        if reg is None:
            perm = fk.linear_assignment(cost)
            transport[p] = torch.eye(n)[perm]
        else:
            transport[p] = n * fk.sinkhorn((cost / cost.max().clamp(min=1e-30)).float(), reg=reg, max_iter=2000).plan
    moved = soft_apply(spec, transport, state_b)
    return {k: moved[k].to(v.dtype).contiguous() for k, v in state_b.items()}


def ot_fusion(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    order: list[str] | None = None,
    reg: float | None = None,
    weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """OT fusion (Singh & Jaggi, 2020): (1 − weight)·A + weight·T(B), T from :func:`ot_transport`."""
    moved = ot_transport(spec, state_a, state_b, order=order, reg=reg)
    return {
        k: fk.weighted_sum([v, moved[k]], [1 - weight, weight]) if v.is_floating_point() else v.clone()
        for k, v in state_a.items()
    }
