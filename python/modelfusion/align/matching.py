"""Permutation alignment of model B to model A (Ainsworth et al., 2023, "Git Re-Basin").

Weight matching maximises Σ_layers ⟨W_A, P_out W_B P_inᵀ⟩ by coordinate descent: one permutation
at a time, in random order, is the linear assignment that best matches its units' weight vectors
(with the other permutations held), until a sweep changes nothing. Activation matching matches
units by the correlation of their activations on data (one assignment per permutation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import fusion_kernels as fk

from ..errors import ParameterError
from .spec import Perms, PermutationSpec, apply_perms, identity_perms


@dataclass
class MatchResult:
    perms: Perms  # apply_perms(spec, perms, state_b) aligns B to A
    sweeps: int  # coordinate-descent sweeps run (the last changed nothing, unless max_sweeps stopped it)
    objective: float  # Σ ⟨W_A, aligned W_B⟩ over the spec's tensors


def _unit_matrix(w: torch.Tensor, axis: int) -> torch.Tensor:
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def _cost(spec: PermutationSpec, p: str, a: Mapping, b: Mapping, perms: Perms, table) -> torch.Tensor:
    """S[i, j] = Σ over p's tensors of ⟨unit i of A, unit j of B⟩, B's other axes already aligned."""
    n = a[spec.axes[p][0][0]].shape[spec.axes[p][0][1]]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for key, axis in spec.axes[p]:
        wb = b[key]
        others = {ax: perms[q] for ax, q in table[key].items() if ax != axis}
        if others:
            wb = fk.permute(wb, others)
        cost += (_unit_matrix(a[key].float(), axis) @ _unit_matrix(wb.float(), axis).T).double()
    return cost


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    init: Perms | None = None,
) -> MatchResult:
    """Coordinate descent over the spec's permutations (random order each sweep, from ``seed``),
    from ``init`` (a warm start, e.g. an earlier result) or the identity."""
    spec.check(state_a)
    spec.check(state_b)
    perms = dict(init) if init is not None else identity_perms(spec, state_a)
    table = spec.by_tensor()
    g = torch.Generator().manual_seed(seed)
    names = list(spec.axes)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (reported after the loop)
        changed = False
        for i in torch.randperm(len(names), generator=g).tolist():
            p = names[i]
            cost = _cost(spec, p, state_a, state_b, perms, table)
            rows = torch.arange(cost.shape[0])
            new = fk.linear_assignment(cost, maximize=True)
            if cost[rows, new].sum() > cost[rows, perms[p]].sum() + 1e-12 * cost.abs().sum():
                perms[p], changed = new, True
        if not changed:
            break
    aligned = apply_perms(spec, perms, state_b)
    objective = sum(float((state_a[k].double() * aligned[k].double()).sum()) for k in table)
    return MatchResult(perms, sweeps, objective)


def _activations(model: nn.Module, sites: dict[str, str], data: Iterable) -> dict[str, torch.Tensor]:
    """Per site: its output's units as rows, examples (and spatial positions) as columns."""
    modules = dict(model.named_modules())
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in sites}

    def hook(p):
        def record(_module, _args, out):
            out = out.detach().float()
            chunks[p].append(out.movedim(1, 0).reshape(out.shape[1], -1) if out.dim() > 2 else out.T)

        return record

    handles = [modules[name].register_forward_hook(hook(p)) for p, name in sites.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in data:
                model(batch[0] if isinstance(batch, (list, tuple)) else batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: torch.cat(c, dim=1) for p, c in chunks.items()}


def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data: Iterable) -> Perms:
    """Each permutation is the assignment maximising the summed correlation of matched units'
    activations at the spec's site (statistics gathered with forward hooks in one pass each)."""
    missing = set(spec.axes) - set(spec.sites)
    if missing:
        raise ParameterError(f"spec: permutations {sorted(missing)} have no activation site")
    data = list(data)
    acts_a, acts_b = _activations(model_a, spec.sites, data), _activations(model_b, spec.sites, data)
    perms = {}
    for p in spec.axes:
        a, b = acts_a[p], acts_b[p]
        a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-8)
        b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True) + 1e-8)
        perms[p] = fk.linear_assignment((a @ b.T / a.shape[1]).double(), maximize=True)
    return perms


def align_to_reference(
    spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], reference: int = 0, **options
) -> list[dict[str, torch.Tensor]]:
    """Every state weight-matched to ``states[reference]`` (returned as it is), for merging N > 2 models."""
    if not 0 <= reference < len(states):
        raise ParameterError(f"reference: expected an index below {len(states)}, got {reference}")
    out = []
    for i, s in enumerate(states):
        if i == reference:
            out.append(dict(s))
        else:
            out.append(apply_perms(spec, weight_matching(spec, states[reference], s, **options).perms, s))
    return out
