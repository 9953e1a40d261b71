"""Merges in the singular-vector space of each layer's task matrices, and the magnitude-selection
merges FusionBench's tables lead with, on state dicts (τᵢ = θᵢ − θ₀ for a base θ₀):

- :func:`magmax` (Marczak et al., 2024): τ = the τᵢ of largest |τᵢ| per element (a later model wins
  a tie); θ = θ₀ + λ·τ.
- :func:`ties_global`: TIES with one threshold per model over all its tensors (FusionBench's and
  the paper's semantics, against the per-tensor top-k of :func:`~modelfusion.average.merge`): keep
  |τᵢ| ≥ its model's (D − ⌊D·k⌋)-th smallest |τᵢ| over all D elements; elect σ = sign(Σᵢ τᵢ)
  (0 takes the sign of Σ σ over the whole model); combine the agreeing kept values by ``sum``,
  ``mean`` or ``max`` (largest magnitude, signed σ); θ = θ₀ + λ·τ.
- :func:`tsv_merge` (TSV-M, Gargiulo et al., 2025): per 2-D tensor, the top ⌊r/T⌋ singular triplets
  of each τᵢ (r = min(m, n)) side by side, U and Vᵀ replaced by their orthogonal polar factors:
  τ = U⊥·diag(S)·V⊥ᵀ; other tensors: the mean τᵢ.
- :func:`iso_c` (Marczak et al., 2025): per 2-D tensor, Σᵢ τᵢ = U·S·Vᵀ with every singular value
  set to their mean; other tensors: the mean τᵢ.
- :func:`iso_cts`: the common subspace (top singular vectors of Σᵢ τᵢ, a ``common_space_fraction``
  of r rounded so the rest splits evenly over the T tasks) plus each task's top directions of
  τᵢ projected off it, orthogonalised, with one isotropic singular value.

The SVDs of all same-shape matrices of a model run as one batched call. Tensors that are not
floats are copied from the base; ``exclude_keys`` (and ``remove_keys``) name tensors kept out of
the decompositions (averaged) or, for TIES, left at the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

import fusion_kernels as fk
from fusion_kernels.compat.fusion_bench import ties_state

from ..errors import ParameterError
from .dare import DareDrop
from .state import State, StateLike, aligned

DECOMPOSE_BYTES = 1 << 28  # task matrices per batched decomposition (256 MiB)


class _TaskVectors:
    """τᵢ = θᵢ − θ₀ of the base's float tensors, formed tensor by tensor when asked (times
    ``scales[i]`` when given), never kept for the whole model."""

    def __init__(
        self,
        base: StateLike,
        models: Sequence[StateLike],
        scales: Sequence[float] | None = None,
        transform: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
    ):
        if len(models) == 0:
            raise ParameterError("models: expected at least one fine-tuned model, got none")
        states = aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(len(models))])
        self.base, self.models, self.scales, self.transform = states[0], states[1:], scales, transform
        self.keys = [k for k, t in self.base.items() if t.is_floating_point()]

    def one(self, i: int, k: str) -> torch.Tensor:
        """τᵢ of tensor k (after ``transform(i, k, τᵢ)`` when given, e.g. DARE's drop)."""
        tau = self.models[i][k].to(self.base[k].dtype) - self.base[k]
        tau = tau if self.transform is None else self.transform(i, k, tau)
        return tau if self.scales is None else tau * self.scales[i]

    def of(self, k: str) -> list[torch.Tensor]:
        """Every model's τ of tensor k."""
        return [self.one(i, k) for i in range(len(self.models))]

    def into(self, i: int, k: str, out: torch.Tensor) -> torch.Tensor:
        """τᵢ of tensor k written into ``out`` (one pass when there is no transform, scale or cast)."""
        if self._plain(i, k):
            return torch.sub(self.models[i][k], self.base[k], out=out)
        return out.copy_(self.one(i, k))

    def sum_into(self, k: str, out: torch.Tensor) -> torch.Tensor:
        """Σᵢ τᵢ of tensor k, added in model order, written into ``out``. Without transform, scale or
        cast, in one pass of ``fk.task_arithmetic(add_base=False)``: the same bits as τ₁ + τ₂ + …
        in out's dtype, where it is the base's (3x faster than torch's sub and add over a ViT-B/32's
        matrices)."""
        models = range(len(self.models))
        if all(self._plain(i, k) for i in models) and out.dtype == self.base[k].dtype:
            return fk.task_arithmetic(self.base[k], [self.models[i][k] for i in models], out=out, add_base=False)
        scratch = torch.empty_like(out)
        total = self.into(0, k, out)
        for i in models[1:]:
            total += self.into(i, k, scratch)
        return out

    def _plain(self, i: int, k: str) -> bool:
        return self.transform is None and self.scales is None and self.models[i][k].dtype == self.base[k].dtype


def _result(base: State, merged: State, scale: float) -> State:
    """θ₀ + λ·τ for the merged keys (written over τ, which the merges own, where the dtypes match),
    the base's own tensors (cloned) elsewhere."""

    def one(t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if tau.dtype == t.dtype:
            return tau.mul_(scale).add_(t) if scale != 1.0 else tau.add_(t)
        return (t + scale * tau).to(t.dtype)

    return {k: one(t, merged[k]) if k in merged else t.clone() for k, t in base.items()}


def _mean(tv: _TaskVectors, k: str) -> torch.Tensor:
    """The running mean FusionBench's subspace merges take of the τᵢ of the tensors they do not
    decompose, mean += (τᵢ − mean)/i: its operations in its order, through two scratch tensors."""
    mean = tv.one(0, k)
    if len(tv.models) == 1:
        return mean
    tau, step = torch.empty_like(mean), torch.empty_like(mean)
    for i in range(1, len(tv.models)):
        torch.sub(tv.into(i, k, tau), mean, out=step)
        mean += step.div_(i + 1)
    return mean


def _batch_size(keys: int, key_bytes: int) -> int:
    """Tensors per batch: at most :data:`DECOMPOSE_BYTES` of task matrices (one tensor at least),
    a multiple of the thread count where that fits (the decompositions run a matrix per thread, so
    a batch of 3 on 2 threads leaves one idle a third of the time), the batches as even as that allows."""
    step, threads = max(1, DECOMPOSE_BYTES // key_bytes), torch.get_num_threads()
    if step < threads:
        return step
    step -= step % threads
    even = -(-keys // -(-keys // step))  # as many batches, filled evenly
    return min(step, -(-even // threads) * threads, keys)


def _decomposed(
    base: StateLike,
    models: Sequence[StateLike],
    exclude_keys: Sequence[str],
    per_shape: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    tau_scales: Sequence[float] | None = None,
    summed: bool = False,
) -> State:
    """θ₀ + λ·τ where τ of each group of same-shape 2-D tensors is ``per_shape([T, L, m, n] task
    matrices, float32 or float64) -> [L, m, n]`` (``summed``: of their sum Σᵢ τᵢ [L, m, n]) and the
    mean τᵢ elsewhere. A group goes through ``per_shape`` in batches of L tensors, their T task
    matrices at most :data:`DECOMPOSE_BYTES` (one tensor at least), so the peak memory stays a few
    of them above the merged model; the decompositions run a matrix per thread, so L ≥ 2 pays."""
    tv = _TaskVectors(base, models, tau_scales)
    tasks = len(tv.models)
    groups: dict[tuple, list[str]] = {}
    merged: State = {}
    for k in tv.keys:
        if tv.base[k].dim() == 2 and k not in exclude_keys:
            groups.setdefault(tuple(tv.base[k].shape), []).append(k)
        else:
            merged[k] = _mean(tv, k)
    copies = 1 if summed else tasks
    plan = []  # (shape, keys, compute dtype, tensors per batch)
    for shape, keys_of_shape in groups.items():
        wide = torch.float64 if tv.base[keys_of_shape[0]].dtype == torch.float64 else torch.float32
        # the budget counts T matrices a tensor also when summed: the decomposition's own work is a few of them
        step = _batch_size(len(keys_of_shape), tasks * math.prod(shape) * wide.itemsize)
        plan.append((shape, keys_of_shape, wide, step))
    # one buffer for every batch's task matrices: fresh pages for each would cost their faults again
    buffer_bytes = max(
        (copies * min(step, len(keys)) * math.prod(shape) * wide.itemsize for shape, keys, wide, step in plan),
        default=0,
    )
    buffer = torch.empty(buffer_bytes, dtype=torch.uint8)
    for shape, keys_of_shape, wide, step in plan:
        for start in range(0, len(keys_of_shape), step):
            batch = keys_of_shape[start : start + step]
            stack = buffer[: copies * len(batch) * math.prod(shape) * wide.itemsize].view(wide)
            if summed:  # Σᵢ τᵢ in order
                stack = stack.view(len(batch), *shape)
                for j, k in enumerate(batch):
                    tv.sum_into(k, stack[j])
            else:
                stack = stack.view(tasks, len(batch), *shape)  # [T, L, m, n]
                for j, k in enumerate(batch):
                    for i in range(tasks):
                        tv.into(i, k, stack[i, j])
            for k, value in zip(batch, per_shape(stack).unbind(0), strict=True):
                merged[k] = value.to(tv.base[k].dtype).contiguous()  # a model's tensors: contiguous
    del buffer
    return _result(tv.base, merged, scale)


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor W·Vᵀ of x = W·Σ·Vᵀ (batched)."""
    return fk.polar(x, values=False)[0]


def _polar_product(u: torch.Tensor, s: torch.Tensor | None, vh: torch.Tensor) -> torch.Tensor:
    """P(u)·diag(s)·P(vh) for P the polar factor (batched; no diag when s is None). The taller
    side's factor is taken last with the rest as its ``right`` (a tall factor from its Gram,
    x·G^(-1/2), then costs one big product where Q and then Q·rest take two)."""
    if u.shape[-2] >= vh.shape[-1]:
        rest = _polar(vh)
        return fk.polar(u, right=rest if s is None else rest.mul_(s.unsqueeze(-1)), values=False)[0]
    rest = _polar(u).mT  # (P(u)·S·P(vh))ᵀ = P(vhᵀ)·S·P(u)ᵀ
    return fk.polar(vh.mT, right=rest if s is None else rest.mul_(s.unsqueeze(-1)), values=False)[0].mT


def magmax(base: StateLike, models: Sequence[StateLike], scaling_factor: float = 1.0) -> State:
    """MagMax: θ₀ + λ·(per element, the τᵢ of largest magnitude; ties go to the later model), one
    fused pass per tensor (:func:`fusion_kernels.magmax`, float32 arithmetic)."""
    tv = _TaskVectors(base, models)
    merged = {k: fk.magmax(tv.base[k], [m[k].to(tv.base[k].dtype) for m in tv.models], scaling_factor) for k in tv.keys}
    return {k: merged[k] if k in merged else t.clone() for k, t in tv.base.items()}


def _global_threshold(tensors: Callable[[], Iterator[torch.Tensor]], rank: int) -> torch.Tensor:
    """The ``rank``-th smallest |x| (1-based) over all the tensors ``tensors()`` yields, without
    concatenating or keeping them: a histogram of the high 16 bits of the float32 keys, then of the
    low 16 bits inside the bin found (two passes)."""

    def keys():
        for t in tensors():
            yield t.float().abs().reshape(-1).view(torch.int32)

    high = sum(torch.bincount(k >> 16, minlength=1 << 15) for k in keys())
    below = torch.cumsum(high, 0)
    bin_ = int(torch.searchsorted(below, torch.tensor(rank), right=False))
    rank -= int(below[bin_ - 1]) if bin_ else 0
    low = sum(torch.bincount(k[(k >> 16) == bin_] & 0xFFFF, minlength=1 << 16) for k in keys())
    value = (bin_ << 16) | int(torch.searchsorted(torch.cumsum(low, 0), torch.tensor(rank), right=False))
    return torch.tensor([value], dtype=torch.int32).view(torch.float32)[0]


def _ties_global_fused(
    tv: _TaskVectors, keys: list[str], k: int, merge_func: str, scaling_factor: float, drop: DareDrop | None
) -> State:
    """ties_global on the engine (float32, ``sum``/``mean``): :func:`fusion_kernels.compat.fusion_bench.ties_state`.
    With DARE's ``drop``, the dropped τ̃ᵢ are drawn once by the engine and kept (N float32 copies
    of the model, as FusionBench's flattened [N, D] matrix) instead of redrawn in every pass."""
    dropped = None
    if drop is not None:
        dropped = [{key: drop.engine(i, key, m[key] - tv.base[key]) for key in keys} for i, m in enumerate(tv.models)]
    merged = ties_state(tv.base, tv.models, keys, k, merge_func, scaling_factor, task_vectors=dropped)
    return {key: merged[key] if key in merged else t.clone() for key, t in tv.base.items()}


def ties_global(
    base: StateLike,
    models: Sequence[StateLike],
    threshold: float = 0.2,
    merge_func: str = "sum",
    scaling_factor: float = 1.0,
    remove_keys: Sequence[str] = (),
    drop: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
) -> State:
    """TIES with one magnitude threshold per model over all its tensors (see the module docstring);
    ``threshold``: the fraction kept (a percentage when above 1); ``drop``: applied to each τᵢ first
    (:func:`~modelfusion.average.dare_drop`: DARE-TIES). Task vectors are formed tensor by tensor in
    each pass, never kept for the whole model."""
    if merge_func not in ("sum", "mean", "max"):
        raise ParameterError(f"merge_func: expected 'sum', 'mean' or 'max', got {merge_func!r}")
    keep = threshold / 100 if threshold > 1 else threshold
    if not 0 <= keep < 1:
        raise ParameterError(f"threshold: expected a kept fraction in [0, 1) or a percentage < 100, got {threshold}")
    tv = _TaskVectors(base, models, transform=drop)
    ref = tv.base
    keys = [k for k in tv.keys if k not in remove_keys]
    total = sum(ref[k].numel() for k in keys)

    rank = total - int(total * keep)
    fused = drop is None or isinstance(drop, DareDrop)
    fused = fused and all(s[k].dtype == torch.float32 for s in (ref, *tv.models) for k in keys)
    if fused and total:
        return _ties_global_fused(tv, keys, total - rank + 1, merge_func, scaling_factor, drop)
    cuts = [_global_threshold(lambda i=i: (tv.one(i, k) for k in keys), rank) for i in range(len(tv.models))]

    def trimmed(k: str) -> torch.Tensor:  # [T, ...]: the kept task vectors of tensor k
        taus = torch.stack(tv.of(k))
        cut = torch.stack(cuts).reshape(-1, *([1] * ref[k].dim()))
        return torch.where(taus.float().abs() >= cut, taus, 0)

    majority = torch.sign(sum(torch.sign(trimmed(k).sum(0)).sum() for k in keys))
    merged = {}
    for k in keys:
        kept = trimmed(k)
        sign = torch.sign(kept.sum(0))
        sign = torch.where(sign == 0, majority, sign)
        agree = torch.where(torch.where(sign > 0, kept > 0, kept < 0), kept, 0)
        if merge_func == "sum":
            merged[k] = agree.sum(0)
        elif merge_func == "mean":
            merged[k] = agree.sum(0) / (agree != 0).sum(0).clamp(min=1)
        else:
            merged[k] = agree.abs().amax(0) * sign
    return _result(ref, merged, scaling_factor)


def tsv_merge(
    base: StateLike,
    models: Sequence[StateLike],
    alpha: float | Sequence[float] | None = None,
    exclude_keys: Sequence[str] = (),
) -> State:
    """TSV-M; ``alpha``: one factor for the merged τ, or one per model applied to each τᵢ first."""
    tau_scales = None
    if alpha is not None and not isinstance(alpha, (int, float)):
        tau_scales = [float(a) for a in alpha]
        if len(tau_scales) != len(models):
            raise ParameterError(f"alpha: expected one factor per model ({len(models)}), got {len(tau_scales)}")
    tasks = len(models)

    def per_shape(stack: torch.Tensor) -> torch.Tensor:
        keep = min(stack.shape[-2:]) // tasks
        u, s, vh = fk.truncated_svd(stack, keep)  # [T, L, m, keep], [T, L, keep], [T, L, keep, n]
        # side by side; when T·keep < r, the r − T·keep zero columns of the paper's form add nothing
        sum_u, sum_s, sum_vh = torch.cat(u.unbind(0), -1), torch.cat(s.unbind(0), -1), torch.cat(vh.unbind(0), -2)
        return _polar_product(sum_u, sum_s, sum_vh)

    scale = float(alpha) if isinstance(alpha, (int, float)) else 1.0
    return _decomposed(base, models, exclude_keys, per_shape, scale, tau_scales)


def iso_c(
    base: StateLike, models: Sequence[StateLike], scaling_factor: float = 1.0, exclude_keys: Sequence[str] = ()
) -> State:
    """Iso-C: Σᵢ τᵢ with its singular values flattened to their mean (2-D tensors)."""

    def per_shape(total: torch.Tensor) -> torch.Tensor:
        # U·diag(mean S)·Vh = mean S · Q, and Σ S = trace(Qᵀ·total) (total = Q·H, trace H = Σ S)
        q = fk.polar(total, values=False)[0]
        trace = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(q, total, strict=True)])
        return q.mul_((trace / min(total.shape[-2:]))[..., None, None])

    return _decomposed(base, models, exclude_keys, per_shape, scaling_factor, summed=True)


def iso_cts(
    base: StateLike,
    models: Sequence[StateLike],
    scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8,
    exclude_keys: Sequence[str] = (),
) -> State:
    """Iso-CTS: common and task-specific subspaces, orthogonalised, one isotropic singular value."""
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ParameterError(f"common_space_fraction: expected a number in [0, 1], got {common_space_fraction}")
    tasks = len(models)

    def per_shape(stack: torch.Tensor) -> torch.Tensor:
        r = min(stack.shape[-2:])
        common = r - round((r - int(r * common_space_fraction)) / tasks) * tasks
        per_task = (r - common) // tasks
        # a negative ``common`` (a tiny r, many tasks) keeps what FusionBench's u[..., :common] keeps
        cu, cs, cvh = fk.truncated_svd(stack.sum(0), len(range(r)[:common]))
        m, kept = cu.shape[-2:]
        # τᵢ off the common space, (I − cu·cuᵀ)·τᵢ. Where its complement is the smaller, that is
        # qc·B with B = qcᵀ·τᵢ and qc an orthonormal basis of the complement (the last columns of
        # cu's complete QR); qc·B's SVD is qc·(B's), and B has m − kept rows: fewer FLOPs, a small Gram
        qc = torch.linalg.qr(cu, mode="complete")[0][..., kept:] if m - kept < kept else None
        parts_u, parts_s, parts_vh = [], [], []
        for i in range(tasks):
            if qc is None:
                tu, ts, tvh = fk.truncated_svd(stack[i] - cu @ (cu.transpose(-1, -2) @ stack[i]), per_task)
            else:
                bu, ts, tvh = fk.truncated_svd(qc.transpose(-1, -2) @ stack[i], per_task)
                tu = qc @ bu
            parts_u.append(tu)
            parts_s.append(ts)
            parts_vh.append(tvh)
        all_u = torch.cat([*parts_u, cu], -1)
        all_s = torch.cat([*parts_s, cs], -1)
        all_vh = torch.cat([*parts_vh, cvh], -2)
        return _polar_product(all_u, None, all_vh).mul_(all_s.mean(-1)[..., None, None])

    return _decomposed(base, models, exclude_keys, per_shape, scaling_factor)
