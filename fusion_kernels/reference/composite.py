"""Merge methods composed of reductions and elementwise steps, in pure PyTorch (float32 arithmetic,
float64 for float64 inputs; results in the inputs' dtype). Their semantics are mergekit 0.1.5's:

    nearswap(a, b, t):    w = clamp(t / max(|a − b|, 1e-6), 0, 1);  w·b + (1 − w)·a
    nuslerp(t, v0, v1):   slerp of v0, v1 as vectors (flattened, or each row/column alone);
                          linear where they are (anti)parallel; with a base: of the task vectors
    multislerp(xs, w):    weighted mean of the unit vectors, tangent-space average, exponential map
                          back, times the weighted mean norm; with a base: of the task vectors
    karcher(xs, w):       the weighted Karcher (Fréchet) mean of the unit vectors on the sphere
                          (fixed-point iteration), times the weighted mean norm
    sce(base, xs, k):     keep the top-k fraction by variance across models, TIES sign election,
                          weights ∝ mean square of each task vector, weighted mean of the agreeing
    arcee_fusion(b, x):   importance s = |x − b| · KL(softmax(x) ‖ softmax(b)) per row (last dim);
                          keep x where s ≥ median(s) + 1.5·IQR(s), else b
    ram(base, xs, ε):     τᵢ kept where |τᵢ| > ε; each element the mean of the kept τᵢ
    ramplus_tl(…, r, α):  as ram, but a model's elements that only it keeps are scaled by
                          λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = (its kept elements others keep too) / (the rest)
"""

from __future__ import annotations

import math

import torch

from ..errors import WeightError
from .magnitude_prune import top_k_mask


def flat_pieces(tensors: list[torch.Tensor], size: int):
    """The tensors' flat elements ``size`` at a time (at least one piece): (the slice, each tensor's
    piece), so an elementwise composite can run with temporaries of one piece."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, max(flat[0].numel(), 1), size):
        where = slice(start, start + size)
        yield where, [f[where] for f in flat]


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a32, b32 = _work(a), _work(b)
    w = (a32 - b32).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0, 1)  # in place: one temporary
    return torch.lerp(a32, b32, w).to(a.dtype)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True):
    """Spherical interpolation of two tensors seen as one vector (``flatten``) or as vectors along
    their last dim (dim 0 with ``row_wise``): c0·v0 + c1·v1 with c0 = sin((1 − t)θ)/sin θ,
    c1 = sin(tθ)/sin θ, θ the angle between the vectors (c0 = 1 − t, c1 = t where they are
    (anti)parallel). The coefficients are per vector, so the only whole-tensor temporaries are the
    float32 copies and the result."""
    shape, dtype = v0.shape, v0.dtype
    a, b = _work(v0), _work(v1)
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    dot = torch.linalg.vecdot(a, b).unsqueeze(-1)
    lengths = a.norm(dim=-1, keepdim=True).clamp(min=1e-7) * b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (dot / lengths).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.where(colinear, 1, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    out = torch.addcmul(a * c0, b, c1)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape).to(dtype)


def multislerp(xs: list[torch.Tensor], weights: list[float], *, normalize: bool = True, eps: float = 1e-8):
    dtype, shape = xs[0].dtype, xs[0].shape
    if len(xs) == 1:
        return xs[0]
    flat = torch.stack([_work(x).reshape(-1) for x in xs])
    w = torch.tensor(weights, dtype=flat.dtype)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    raw = torch.mv(units.T, w)  # Σ wᵢ·uᵢ in one pass
    length = float(raw.norm())
    if length < eps:
        if len(xs) == 2:  # antipodal pair: the linear blend, as mergekit falls back to
            return (flat[0] * w[0] + flat[1] * w[1]).reshape(shape).to(dtype)
        raise WeightError(
            "multislerp: the weighted mean of the unit vectors is zero (antipodal inputs); change the weights"
        )
    del flat
    mean = raw / length
    # the tangent Σ wᵢ·(uᵢ − (uᵢ·mean)·mean) = raw − (Σ wᵢ·uᵢ·mean)·mean, in place of raw
    tangent = raw.sub_(mean, alpha=float(w @ torch.mv(units, mean)))
    size = float(tangent.norm()) + eps
    scale = float((norms[:, 0] * w).sum())
    out = mean.mul_(math.cos(size) * scale).add_(tangent, alpha=math.sin(size) / size * scale)
    return out.reshape(shape).to(dtype)


def karcher(xs: list[torch.Tensor], weights: list[float], *, max_iter: int = 10, tol: float = 1e-5):
    dtype, shape = xs[0].dtype, xs[0].shape
    if len(xs) == 1:
        return xs[0]
    flat = [_work(x).reshape(-1) for x in xs]
    norms = [float(f.norm()) for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(shape, dtype=dtype)
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = sum(a * u for a, u in zip(alphas, units, strict=True))
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):  # in place: two passes per model, no whole-vector temporaries
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units, strict=True):
            dot = min(max(float(torch.dot(mean, u)), -1.0), 1.0)
            theta = math.acos(dot)
            if theta >= tol:
                c = a * theta / math.sin(theta)
                tangent.add_(u, alpha=c).add_(mean, alpha=-c * dot)
        size = float(tangent.norm())
        if size < tol:
            break
        mean.mul_(math.cos(size)).add_(tangent, alpha=math.sin(size) / size)
        length = float(mean.norm())
        if length > tol:
            mean.div_(length)
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    return (scale * mean).reshape(shape).to(dtype)


def sce(base: torch.Tensor, xs: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE in four steps (each a function here, so the engine can run them piece by piece):
    the variance across models, the top-k mask by it, each model's energy, the merge."""
    if not xs:
        return base
    mask = sce_mask(sce_variance(base, xs), select_topk) if select_topk < 1 else None
    energies = [e / base.numel() for e in sce_energies(base, xs, mask)] if base.numel() else [0.0] * len(xs)
    return sce_combine(base, xs, mask, sce_weights(energies))


def sce_variance(base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """Each element's variance across the task vectors (float32; as torch.var(0, unbiased=False),
    written out: torch's var over a short leading dim takes seconds per 10⁷ elements)."""
    b = _work(base)
    tvs = [_work(x) - b for x in xs]
    mean = sum(tvs) / len(tvs)
    return sum((tv - mean).square_() for tv in tvs) / len(tvs)


def sce_mask(var: torch.Tensor, density: float) -> torch.Tensor:
    """The elements whose variance is among the ⌊density · nonzero⌋ largest (ties: lowest index)."""
    k = int(int(torch.count_nonzero(var)) * density)
    return top_k_mask(var, k) if density > 0 and k > 0 else torch.zeros_like(var, dtype=torch.bool)


def sce_energies(base: torch.Tensor, xs: list[torch.Tensor], mask: torch.Tensor | None) -> list[float]:
    """Σ of each (masked) task vector's squares, in float64."""
    b = _work(base)
    tvs = [_work(x) - b for x in xs]
    return [float((tv if mask is None else tv * mask).double().square().sum()) for tv in tvs]


def sce_weights(energies: list[float]) -> list[float]:
    """Weights ∝ each model's mean square; equal where they all vanish."""
    s = sum(energies)
    return [1 / len(energies)] * len(energies) if abs(s) < 1e-6 else [e / s for e in energies]


def sce_combine(base: torch.Tensor, xs: list[torch.Tensor], mask: torch.Tensor | None, weights: list[float]):
    """TIES' sign election (the sign of the sum; 0 counts as +), then the weighted mean of the agreeing."""
    b = _work(base)
    tv = torch.stack([_work(x) - b for x in xs])
    if mask is not None:
        tv = tv * mask
    total = tv.sum(0)
    agree = torch.where(total >= 0, tv > 0, tv < 0)
    w = torch.tensor(weights, dtype=tv.dtype, device=tv.device).reshape(-1, *([1] * base.dim())) * agree
    merged = (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)
    return (b + merged).to(base.dtype)


def arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Quantiles are exact: mergekit takes them from a random sample of 10⁶ elements when there
    are more, which makes its result vary from run to run."""
    importance = arcee_importance(base, x)
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    # mergekit's index rule on the sorted values, by selection (no sort: it allocates int64 indices)
    q1, median, q3 = (float(flat.kthvalue(int(f * last) + 1).values) for f in (0.25, 0.5, 0.75))
    return arcee_select(base, x, importance, median + 1.5 * (q3 - q1))


def arcee_importance(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x − b| · KL(softmax(x) ‖ softmax(b)), the KL per vector along the last dim (float32)."""
    b, x32 = _work(base), _work(x)
    return (x32 - b).abs_().mul_(arcee_kl(b, x32))


def arcee_kl(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) + 1e-8 ‖ softmax(b) + 1e-8) per vector along the last dim, kept as a size-1 dim
    (b and x already in the working precision)."""
    p = torch.softmax(x, dim=-1).add_(1e-8)
    q = torch.softmax(b, dim=-1).add_(1e-8)
    return (p * (p / q).log_()).sum(-1, keepdim=True)


def arcee_select(base: torch.Tensor, x: torch.Tensor, importance: torch.Tensor, cut: float) -> torch.Tensor:
    """x where its importance reaches ``cut`` (median + 1.5·IQR), else the base."""
    return torch.where(importance >= cut, _work(x), _work(base)).to(base.dtype)


def ram(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    epsilon: float,
    r: float | None = None,
    alpha: float = 0.0,
    scales: list[float] | None = None,
):
    """Reinforced Agent Merging; with ``r``, RAM+ (tensor-local): see the module docstring.
    ``scales``: the λᵢ already computed (from :func:`ram_counts` over the whole tensor)."""
    if not xs:
        return base
    b = _work(base)
    taus = [_work(x) - b for x in xs]
    kept = [tau.abs() > epsilon for tau in taus]
    count = sum(k.to(torch.int32) for k in kept)
    if scales is None:
        scales = [1.0] * len(xs) if r is None else ram_scales(ram_counts(base, xs, epsilon), epsilon, r, alpha)
    total = sum(torch.where(k, tau, 0) for k, tau in zip(kept, taus, strict=True))  # Σ of the kept τᵢ
    merged = total / count.clamp(min=1)  # their mean where several keep an element
    if any(scale != 1.0 for scale in scales):  # RAM+: an element only one model keeps, scaled by its λ
        alone = sum(torch.where(k, tau * scale, 0) for k, tau, scale in zip(kept, taus, scales, strict=True))
        merged = torch.where(count == 1, alone, merged)
    return (b + merged).to(base.dtype)


def ram_counts(base: torch.Tensor, xs: list[torch.Tensor], epsilon: float) -> list[tuple[int, int]]:
    """Per model: (its kept elements that another model keeps too, those only it keeps)."""
    b = _work(base)
    kept = [(_work(x) - b).abs_() > epsilon for x in xs]
    count = torch.stack(kept).sum(0)
    return [(int((k & (count > 1)).sum()), int((k & (count == 1)).sum())) for k in kept]


def ram_scales(counts: list[tuple[int, int]], epsilon: float, r: float, alpha: float) -> list[float]:
    """RAM+'s λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = shared / max(alone, ε)."""
    return [1 + r * min(max(shared / max(alone, epsilon), 0.0), alpha) for shared, alone in counts]
