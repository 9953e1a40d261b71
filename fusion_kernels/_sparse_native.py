"""Glue between the sparse ops and the C++ kernels: one typed ``_C.SparseMergeSpec`` per merge
(each model's keep rule, the rescale, election and combine), and the top-k threshold query."""

from __future__ import annotations

import torch

from . import _native
from .reference.magnitude_prune import magnitude_threshold as ref_threshold
from .reference.sparse_merge import threshold_key


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def select(base, xs, models: list[int], ks: list[int]) -> list[tuple[int, int]]:
    """(t, cut) of each (model, k) query: the k largest |τ| of that model."""
    flat = _native.lib().magnitude_select(
        _ptr(base), _native.pointers(xs), _native.dtype_code(xs[0].dtype), xs[0].numel(), models, ks, _native.threads()
    )
    return [(flat[2 * q], flat[2 * q + 1]) for q in range(len(models))]


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
    thresholds,
    tie_sign,
    first_model,
    masks,
    ks=None,
) -> None:
    """One native call: the arguments, validated by the op, become a typed ``_C.SparseMergeSpec``.
    ``ks``: exact top-k sizes for ``"magnitude"`` (default ⌊densityᵢ·numel⌋)."""
    lib = _native.lib()
    kind = lib.KeepKind.mask if masks else getattr(lib.KeepKind, sparsify or "all")
    spec = lib.SparseMergeSpec()
    models = []
    for i in range(len(xs)):
        m = lib.ModelKeep()
        m.kind, m.density, m.gamma, m.epsilon = kind, densities[i], gammas[i], epsilons[i]
        if ks is not None:
            m.keep = ks[i]
        if masks:
            m.mask = masks[i].data_ptr()
        elif sparsify == "threshold":
            m.threshold_key = threshold_key(
                thresholds[i], xs[0].dtype, keys16=base is None and xs[0].dtype != torch.float32
            )
        models.append(m)
    spec.models, spec.weights, spec.lam, spec.seed = models, list(weights), lam, seed
    spec.tie = tie_sign
    spec.first_model = first_model
    spec.rescale = getattr(lib.Rescale, rescale or "none")
    spec.consensus = {None: 0, "sum": 1, "count": 2}[consensus]
    spec.elect_weighted = elect_on == "weighted"
    spec.combine = {"sum": 0, "mean_count": 1, "mean_weight": 2, "max": 3}[combine]
    shape = xs[0].shape
    rows, cols = (1, xs[0].numel()) if len(shape) != 2 else shape
    lib.sparse_merge(
        out.data_ptr(),
        _ptr(base),
        _native.pointers(xs),
        _native.dtype_code(xs[0].dtype),
        rows,
        cols,
        spec,
        _native.threads(),
    )


def threshold_values(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """The k-th largest |x| for each k ≥ 1, as a 1-D tensor of x's dtype: the keys the C++ select
    finds, all from one sample and one sweep over x."""
    queries = [k for k in ks if k < x.numel()]  # select() answers "everything" without a value
    keys = [t for t, _ in select(None, [x], [0] * len(queries), queries)] if queries else []
    found = iter(torch.tensor(keys, dtype=torch.int32 if x.dtype == torch.float32 else torch.int16).view(x.dtype))
    values = [next(found) if k < x.numel() else ref_threshold(x, k) for k in ks]
    return torch.stack(values)


def threshold_value(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (k ≥ 1) as a 0-dim tensor of x's dtype."""
    return threshold_values(x, [k])[0]


def sparse_declines(xs, sparsify, rescale, masks) -> str | None:
    if xs[0].dtype == torch.float64:
        return "the C++ sparse kernels take float32, float16 and bfloat16 (float64 runs on 'torch')"
    if sparsify == "della" and not masks:
        if rescale == "inverse_density":
            return "della with rescale='inverse_density' divides by per-element probabilities (runs on 'torch')"
        if xs[0].dim() not in (1, 2):
            return "della's C++ ranking takes 1-D and 2-D tensors (others run on 'torch')"
    return None
