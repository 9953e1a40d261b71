"""Glue between the sparse ops and the C++ kernels: keep rules, thresholds and rescale factors.

A keep rule per model is passed as parallel lists: ``modes`` (0 all, 1 top-k, 2 random, 3 mask),
``topk`` (hi.t, hi.cut, lo.t, lo.cut), ``hash`` (s1, s2, p16) and ``masks`` (addresses or 0).
"""

from __future__ import annotations

import torch

from . import _native
from .reference.magnitude_prune import magnitude_threshold as ref_threshold
from .reference.random_mask import keep_threshold, stream_keys
from .reference.sparse_merge import L1_RESCALE_EPS

EMPTY_TOPK = (1 << 32, 0)
FULL_TOPK = (-1, 0)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def select(base, xs, models: list[int], ks: list[int]) -> list[tuple[int, int]]:
    """(t, cut) of each (model, k) query: the k largest |τ| of that model."""
    flat = _native.lib().magnitude_select(
        _ptr(base), _native.pointers(xs), _native.dtype_code(xs[0].dtype), xs[0].numel(), models, ks, _native.threads()
    )
    return [(flat[2 * q], flat[2 * q + 1]) for q in range(len(models))]


def keep_rules(base, xs, sparsify, densities, gammas, seed, masks, ks=None):
    """``ks``: exact top-k sizes for ``"magnitude"`` (default ⌊densityᵢ·numel⌋)."""
    n, numel = len(xs), xs[0].numel()
    modes, topk, hashes = [], [], []
    if masks:
        return [3] * n, [*EMPTY_TOPK, *EMPTY_TOPK] * n, [0, 0, 0] * n, [m.data_ptr() for m in masks]
    if sparsify in ("magnitude", "magnitude_outliers"):
        keep = list(ks) if ks is not None else [int(d * numel) for d in densities]
        drop = (
            [min(int(g * numel), numel - k) for g, k in zip(gammas, keep, strict=True)]
            if sparsify == "magnitude_outliers"
            else [0] * n
        )
        found = select(base, xs, list(range(n)) * 2, [d + k for d, k in zip(drop, keep, strict=True)] + drop)
        for i in range(n):
            modes.append(1)
            topk += [*found[i], *found[n + i]]
    for i in range(n):
        if sparsify == "random":
            modes.append(2)
            topk += [*EMPTY_TOPK, *EMPTY_TOPK]
            hashes += [*stream_keys(seed, i), keep_threshold(densities[i])]
        else:
            hashes += [0, 0, 0]
            if sparsify is None:
                modes.append(0)
                topk += [*FULL_TOPK, *EMPTY_TOPK]
    return modes, topk, hashes, [0] * n


def sparse_merge(
    out,
    base,
    xs,
    weights,
    sparsify,
    rescale,
    consensus,
    elect_on,
    combine,
    densities,
    gammas,
    epsilons,
    lam,
    seed,
    masks,
    ks=None,
) -> None:
    lib, n = _native.lib(), len(xs)
    code, numel, ptrs = _native.dtype_code(xs[0].dtype), xs[0].numel(), _native.pointers(xs)
    if sparsify == "della" and not masks:
        masks = della_masks(base, xs, densities, epsilons, seed)
    rules = keep_rules(base, xs, sparsify, densities, gammas, seed, masks, ks)
    scales, divide = [1.0] * n, False
    if rescale == "inverse_density" and (sparsify is not None or masks):
        scales, divide = list(densities), True
    elif rescale == "l1":
        norms = lib.kept_l1_norms(_ptr(base), ptrs, code, numel, *rules, _native.threads())
        for i in range(n):
            before, after = norms[2 * i], norms[2 * i + 1]
            if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
                scales[i] = before / after
    total = sum(weights)
    lib.sparse_merge(
        out.data_ptr(),
        _ptr(base),
        ptrs,
        code,
        numel,
        *rules,
        weights,
        scales,
        divide,
        {None: 0, "sum": 1, "count": 2}[consensus],
        elect_on == "weighted",
        {"sum": 0, "mean_count": 1, "mean_weight": 2}[combine],
        total if abs(total) >= 1e-8 else 1.0,
        lam,
        _native.threads(),
    )


def threshold_value(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (k ≥ 1) as a 0-dim tensor of x's dtype, from the key the C++ select finds."""
    if k >= x.numel():  # select() answers "everything" without a value; the minimum is one kthvalue away
        return ref_threshold(x, k)
    ((t, _),) = select(None, [x], [0], [k])
    if x.dtype == torch.float32:
        return torch.tensor([t], dtype=torch.int32).view(torch.float32)[0]
    return torch.tensor([t], dtype=torch.int16).view(x.dtype)[0]


def della_masks(base, xs, densities, epsilons, seed) -> list[torch.Tensor]:
    """Each model's DELLA keep mask (bool, like xs[0]), ranked along rows (a 1-D tensor is one row)."""
    n, shape = len(xs), xs[0].shape
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    f32 = [torch.tensor([d - e, 2 * e], dtype=torch.float32).tolist() for d, e in zip(densities, epsilons, strict=True)]
    keys = [stream_keys(seed, i) for i in range(n)]
    masks = torch.empty((n, *shape), dtype=torch.bool)
    _native.lib().della_masks(
        masks.data_ptr(),
        _ptr(base),
        _native.pointers(xs),
        _native.dtype_code(xs[0].dtype),
        rows,
        cols,
        [lo for lo, _ in f32],
        [spread for _, spread in f32],
        [k[0] for k in keys],
        [k[1] for k in keys],
        _native.threads(),
    )
    return list(masks.unbind(0))


def sparse_declines(xs, sparsify, rescale, masks) -> str | None:
    if xs[0].dtype == torch.float64:
        return "the C++ sparse kernels take float32, float16 and bfloat16 (float64 runs on 'torch')"
    if sparsify == "della" and not masks:
        if rescale == "inverse_density":
            return "della with rescale='inverse_density' divides by per-element probabilities (runs on 'torch')"
        if xs[0].dim() not in (1, 2):
            return "della's C++ ranking takes 1-D and 2-D tensors (others run on 'torch')"
    return None
