"""Permutation alignment of model B to model A (Ainsworth et al., 2023, "Git Re-Basin").

Weight matching maximises Σ_layers ⟨W_A, P_out W_B P_inᵀ⟩ by coordinate descent: one permutation
at a time, in random order, is the linear assignment that best matches its units' weight vectors
(with the other permutations held), until a sweep changes nothing. Activation matching matches
units by the correlation of their activations on data (one assignment per permutation).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import fusion_kernels as fk

from ..errors import ParameterError, StateDictError
from ..ranks import deal_by_cost
from .heads import HeadChoice, expand
from .spec import Perms, PermutationSpec, apply_perms


@dataclass
class MatchResult:
    perms: Perms  # apply_perms(spec, perms, state_b) aligns B to A
    sweeps: int  # coordinate-descent sweeps run (the last changed nothing, unless max_sweeps stopped it)
    objective: float  # Σ ⟨W_A, aligned W_B⟩ over the spec's tensors


def unit_matrix(w: torch.Tensor, axis: int) -> torch.Tensor:
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def _unit_pairs(spec, name, a, b, perms, table, clock=None):
    """Per tensor of permutation ``name``: A's and B's unit vectors as rows (B's other axes aligned)."""
    for key, axis in spec.axes[name]:
        if key not in a:  # held by another rank
            continue
        others = {ax: perms[q] for ax, q in table[key].items() if ax != axis}
        wb = (clock or _Clock(None))("gather", fk.permute, b[key], others) if others else b[key]
        yield unit_matrix(a[key].float(), axis), unit_matrix(wb.float(), axis)


def _rows(spec, name, a, b, perms, table) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_unit_pairs` with the tensors side by side (no columns where this rank holds none)."""
    pairs = list(_unit_pairs(spec, name, a, b, perms, table))
    if not pairs:
        empty = torch.zeros(len(perms[name]), 0)
        return empty, empty
    rows_a, rows_b = zip(*pairs, strict=True)
    return torch.cat(rows_a, 1), torch.cat(rows_b, 1)


class _Ranks:
    """Where the tensors are split over a process group: partial sums are all-reduced and each
    assignment is solved by the group's rank 0 and broadcast. Without a group, both are local."""

    def __init__(self, group):
        self.group = group

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            x = x.contiguous()
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def assign(self, sim: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return _assign(sim)
        if dist.get_rank(self.group) == 0:
            perm = _assign(sim)
        else:
            perm = torch.empty(sim.shape[:-1], dtype=torch.int64, device=sim.device)
        dist.broadcast(perm, group_src=0, group=self.group)
        return perm


class _Clock:
    """Seconds per phase (gather, gemm, assignment) into ``profile`` when one is given."""

    def __init__(self, profile: dict | None):
        self.profile = profile

    def __call__(self, phase: str, fn, *args):
        if self.profile is None:
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        self.profile[phase] = self.profile.get(phase, 0.0) + time.perf_counter() - start
        return out


def _cost(spec, p, a, b, perms, table, clock: _Clock, ranks: _Ranks) -> torch.Tensor:
    """S[i, j] = Σ over p's tensors of ⟨unit i of A, unit j of B⟩ (B's other axes aligned), one
    tensor at a time so that no concatenation of all of them is ever held; summed over ranks."""
    n = len(perms[p])
    cost = torch.zeros(n, n, dtype=torch.float32, device=next(iter(a.values())).device if a else "cpu")
    for ra, rb in _unit_pairs(spec, p, a, b, perms, table, clock):
        clock("gemm", cost.addmm_, ra, rb.T)  # accumulated in place: no n×n temporaries
    return clock("all_reduce", ranks.sum, cost)


def _assign(sim: torch.Tensor) -> torch.Tensor:
    return fk.linear_assignment(sim, maximize=True)  # float32 costs are read as they are, solved in float64


def _match_heads(spec, group, a, b, perms, table, ranks: _Ranks) -> Perms:
    """One coordinate step of an attention layer: KV heads, then query heads within each group,
    then dimensions within heads (Q/K ones fixed under rotary embeddings)."""
    kv, d = group.kv_heads, group.head_dim
    g = group.heads // kv
    (qa, qb), (ka, kb), (va, vb), (oa, ob) = (_rows(spec, getattr(group, t), a, b, perms, table) for t in "qkvo")
    qa, qb, oa, ob = (x.reshape(kv, g, d, x.shape[-1]) for x in (qa, qb, oa, ob))
    ka, kb, va, vb = (x.reshape(kv, d, x.shape[-1]) for x in (ka, kb, va, vb))
    S, assign = ranks.sum, ranks.assign  # every similarity below is a sum over columns: over ranks too

    def dims_sim(x_a, x_b):  # [kv, d, c] x [kv, d, c] -> [kv_a, kv_b, d, d]
        return torch.einsum("sic,tjc->stij", x_a, x_b)

    qk = S(dims_sim(ka, kb) + dims_sim(qa.sum(1), qb.sum(1)))  # query heads pooled: their order is not chosen yet
    vo = S(dims_sim(va, vb) + dims_sim(oa.sum(1), ob.sum(1)))
    eye = torch.arange(d).expand(kv, kv, d)
    qk_dims = eye if group.rope else assign(qk.reshape(-1, d, d)).reshape(kv, kv, d)
    vo_dims = assign(vo.reshape(-1, d, d)).reshape(kv, kv, d)

    def value(sim, dims):
        return sim.gather(-1, dims.unsqueeze(-1)).squeeze(-1).sum(-1)  # [kv_a, kv_b]

    heads = assign(value(qk, qk_dims) + value(vo, vo_dims))
    slots = torch.arange(kv)
    qk_d, vo_d = qk_dims[slots, heads], vo_dims[slots, heads]  # [kv, d]
    qb_m, ob_m = qb[heads], ob[heads]  # B's groups in A's slot order: [kv, g, d, c]
    qb_m = torch.stack([qb_m[s][:, qk_d[s]] for s in range(kv)])
    ob_m = torch.stack([ob_m[s][:, vo_d[s]] for s in range(kv)])
    sim = S(torch.einsum("sric,sqic->srq", qa, qb_m) + torch.einsum("sric,sqic->srq", oa, ob_m))
    query = assign(sim)  # [kv, g]
    q_sel = torch.stack([qb[heads[s]][query[s]] for s in range(kv)])  # [kv, g, d, c]
    o_sel = torch.stack([ob[heads[s]][query[s]] for s in range(kv)])
    if not group.rope:
        qk_d = assign(S(torch.einsum("sic,sjc->sij", ka, kb[heads]) + torch.einsum("sric,srjc->sij", qa, q_sel)))
    vo_d = assign(S(torch.einsum("sic,sjc->sij", va, vb[heads]) + torch.einsum("sric,srjc->sij", oa, o_sel)))
    return expand(group, HeadChoice(heads, query, qk_d, vo_d))


def _score(spec, names, a, b, perms, table, ranks: _Ranks) -> float:
    """Σ over the tensors of ``names`` of ⟨A, B aligned by ``perms``⟩ along those permutations."""
    total = torch.zeros((), dtype=torch.float64)
    for name in names:
        ra, rb = _rows(spec, name, a, b, perms, table)
        total += (ra.double() * rb[perms[name]].double()).sum()
    return float(ranks.sum(total))


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    init: Perms | None = None,
    profile: dict | None = None,
    group: dist.ProcessGroup | None = None,
) -> MatchResult:
    """Coordinate descent over the spec's permutations (random order each sweep, from ``seed``),
    from ``init`` (a warm start, e.g. an earlier result) or the identity. ``profile``: a dict that
    receives the seconds spent in gathers, cost-matrix GEMMs, all-reduces and assignments.

    ``group`` (a torch.distributed process group, e.g. ``dist.group.WORLD``): the state dicts
    of each rank hold only its share of the spec's tensors (each tensor on exactly one rank; see
    :func:`local_keys`). Cost-matrix contributions are summed with ``all_reduce``, rank 0 solves
    each assignment and broadcasts it, and every rank returns the same permutations and
    objective: apply them to its own tensors with ``apply_perms``."""
    clock, ranks = _Clock(profile), _Ranks(group)
    if group is None:
        spec.check(state_a)
        spec.check(state_b)
        sizes = spec.sizes(state_a)
    else:
        sizes = _shared_sizes(spec, state_a, state_b, group)
    perms = dict(init) if init is not None else {p: torch.arange(n) for p, n in sizes.items()}
    table = spec.by_tensor()
    g = torch.Generator().manual_seed(seed)
    members = spec.head_members()
    units = [p for p in spec.axes if p not in members] + [("heads", h) for h in spec.heads]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (reported after the loop)
        changed = False
        for i in torch.randperm(len(units), generator=g).tolist():
            if isinstance(units[i], tuple):
                heads = spec.heads[units[i][1]]
                new = _match_heads(spec, heads, state_a, state_b, perms, table, ranks)
                names = list(new)
                before = _score(spec, names, state_a, state_b, perms, table, ranks)
                after = _score(spec, names, state_a, state_b, {**perms, **new}, table, ranks)
                if after > before + 1e-12 * abs(before) and any(not torch.equal(new[n], perms[n]) for n in names):
                    perms.update(new)
                    changed = True
                continue
            p = units[i]
            cost = _cost(spec, p, state_a, state_b, perms, table, clock, ranks)
            rows = torch.arange(cost.shape[0])
            new = clock("assignment", ranks.assign, cost)
            if cost[rows, new].sum() > cost[rows, perms[p]].sum() + 1e-12 * cost.abs().sum():
                perms[p], changed = new, True
        if not changed:
            break
    objective = torch.zeros((), dtype=torch.float64)
    for key, axes in table.items():  # one aligned tensor at a time
        if key in state_b:
            aligned = fk.permute(state_b[key], {axis: perms[p] for axis, p in axes.items()})
            objective += torch.sum(state_a[key].float() * aligned.float(), dtype=torch.float64).cpu()
    return MatchResult(perms, sweeps, float(ranks.sum(objective)))


def local_keys(nbytes: Mapping[str, int], rank: int, world_size: int) -> list[str]:
    """The tensors (of ``{name: bytes}``, the same on every rank) that ``rank`` holds for a
    distributed :func:`weight_matching`: dealt largest first to the least-loaded rank."""
    owners = deal_by_cost(list(nbytes.values()), world_size)
    return [k for k, r in zip(nbytes, owners, strict=True) if r == rank]


def _shared_sizes(spec: PermutationSpec, a, b, group) -> dict[str, int]:
    """Each permutation's size from the tensors held across the group, after checking that every
    spec tensor is held by exactly one rank with the same shape in A and B (all ranks raise alike)."""
    names = sorted(spec.by_tensor())
    problems = [f"{k!r} is in one state dict but not the other" for k in names if (k in a) != (k in b)]
    problems += [
        f"{k!r} has shape {tuple(a[k].shape)} in A, {tuple(b[k].shape)} in B"
        for k in names
        if k in a and k in b and a[k].shape != b[k].shape
    ]
    local = {}
    for p, pairs in spec.axes.items():
        held = {a[k].shape[axis] for k, axis in pairs if k in a}
        if len(held) > 1:
            problems.append(f"permutation {p!r}: its axes have different sizes {sorted(held)}")
        local[p] = held.pop() if held else None
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, [[k in a for k in names], local, problems], group=group)
    for r, (_, _, found) in enumerate(everyone):
        if found:
            raise StateDictError(f"distributed weight matching: rank {r}: " + "; ".join(found))
    holders = [sum(held[i] for held, _, _ in everyone) for i in range(len(names))]
    wrong = [f"{k!r} ({n} ranks)" for k, n in zip(names, holders, strict=True) if n != 1]
    if wrong:
        raise StateDictError(f"distributed weight matching: each tensor must be held by exactly one rank: {wrong[:5]}")
    sizes = {}
    for p in spec.axes:
        seen = {s[p] for _, s, _ in everyone if s[p] is not None}
        if len(seen) != 1:
            raise StateDictError(f"permutation {p!r}: its axes have sizes {sorted(seen)} across ranks")
        sizes[p] = seen.pop()
    return sizes


def site_activations(model: nn.Module, sites: dict[str, str], data: Iterable) -> dict[str, torch.Tensor]:
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


STATISTICS = ("correlation", "moment")


def activation_matching(
    spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data: Iterable, *, statistic: str = "correlation"
) -> Perms:
    """Each permutation is the assignment maximising Σ over matched units of a similarity of their
    activations at the spec's site: their ``"correlation"`` or their cross moment E[a·b]
    (``"moment"``). Statistics are gathered with forward hooks, one pass over ``data`` per model."""
    if statistic not in STATISTICS:
        raise ParameterError(f"statistic: expected one of {STATISTICS}, got {statistic!r}")
    missing = set(spec.axes) - set(spec.sites)
    if missing:
        raise ParameterError(f"spec: permutations {sorted(missing)} have no activation site")
    data = list(data)
    acts_a, acts_b = site_activations(model_a, spec.sites, data), site_activations(model_b, spec.sites, data)
    perms = {}
    for p in spec.axes:
        a, b = acts_a[p], acts_b[p]
        if statistic == "correlation":
            a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-8)
            b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True) + 1e-8)
        perms[p] = fk.linear_assignment(a @ b.T / a.shape[1], maximize=True)
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
