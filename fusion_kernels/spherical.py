"""The spherical merge methods (nuslerp, multislerp, Karcher mean) and Model Stock's statistics,
computed from the Gram matrix of their inputs.

Each of these results is a linear combination Σ cᵢ·vᵢ of its input vectors (task vectors vᵢ = xᵢ − base
where there is a base): the normalisations, tangent projections and exponential maps of the
reference (:mod:`fusion_kernels.reference.composite`) only move within the span of the vᵢ. Every
norm and angle they need is therefore a quadratic form cᵀGc of the float64 Gram matrix
Gᵢⱼ = vᵢ·vⱼ. So one read of every input builds G (:func:`fusion_kernels.gram`), the whole
iteration runs on N×N numbers, and one weighted sum writes the result: two passes over memory,
whatever the number of iterations, where the reference makes two passes per model per iteration
and keeps float32 copies of every input.
"""

from __future__ import annotations

import math

import torch

from .errors import WeightError
from .ops import gram, weighted_sum


def _combine(xs: list[torch.Tensor], base: torch.Tensor | None, coefs: list[float], out=None) -> torch.Tensor:
    """Σ cᵢ·(xᵢ − base) + base, as one weighted sum of the inputs."""
    if base is None:
        return weighted_sum(xs, coefs, out=out)
    return weighted_sum([base, *xs], [1.0 - sum(coefs), *coefs], out=out)


def _norm(g: torch.Tensor, c: torch.Tensor) -> float:
    return math.sqrt(max(float(c @ g @ c), 0.0))


def nuslerp(t: float, xs: list[torch.Tensor], base: torch.Tensor | None, out=None) -> torch.Tensor:
    """Spherical interpolation of the two (task) vectors seen whole, as reference.composite.nuslerp."""
    g = gram(xs, base)[0]
    length = max(math.sqrt(g[0, 0]), 1e-7) * max(math.sqrt(g[1, 1]), 1e-7)
    cos = min(max(float(g[0, 1]) / length, -1.0), 1.0)
    if 1 - cos * cos <= 1e-16:  # (anti)parallel
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return _combine(xs, base, [c0, c1], out)


def multislerp(
    xs: list[torch.Tensor], base: torch.Tensor | None, weights: list[float], normalize: bool, eps: float, out=None
) -> torch.Tensor:
    """The tangent-space weighted mean of the unit (task) vectors, as reference.composite.multislerp."""
    if len(xs) == 1:
        return _combine(xs, base, [1.0], out)
    g = gram(xs, base)[0]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = g.diagonal().clamp(min=0).sqrt()
    raw = w / (norms + eps)  # Σ wᵢ·uᵢ, uᵢ = vᵢ / (‖vᵢ‖ + eps), as coefficients of the vᵢ
    length = _norm(g, raw)
    if length < eps:
        if len(xs) == 2:  # antipodal pair: the linear blend, as mergekit falls back to
            return _combine(xs, base, w.tolist(), out)
        raise WeightError(
            "multislerp: the weighted mean of the unit vectors is zero (antipodal inputs); change the weights"
        )
    mean = raw / length
    along = float(w @ ((g @ mean) / (norms + eps)))  # Σ wᵢ·(uᵢ·mean)
    tangent = raw - along * mean
    size = _norm(g, tangent) + eps
    scale = float(norms @ w)
    coefs = scale * (math.cos(size) * mean + math.sin(size) / size * tangent)
    return _combine(xs, base, coefs.tolist(), out)


def karcher(xs: list[torch.Tensor], weights: list[float], max_iter: int, tol: float, out=None) -> torch.Tensor:
    """The weighted Karcher mean of the unit vectors times the weighted mean norm, as
    reference.composite.karcher; the iteration runs on coefficients of the unit vectors."""
    if len(xs) == 1:
        return _combine(xs, None, [1.0], out)
    g = gram(xs)[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(len(xs)) if norms[i] > tol]
    if not valid:
        return _combine(xs, None, [0.0] * len(xs), out)
    idx = torch.tensor(valid)
    gu = g[idx][:, idx] / torch.outer(norms[idx], norms[idx])  # the unit vectors' Gram matrix
    alphas = torch.tensor([weights[i] for i in valid], dtype=torch.float64)
    alphas /= alphas.sum()
    mean = alphas.clone()
    length = _norm(gu, mean)
    mean = torch.eye(len(valid), dtype=torch.float64)[0] if length < tol else mean / length
    for _ in range(max_iter):
        dots = (gu @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for k in range(len(valid)):
            theta = math.acos(float(dots[k]))
            if theta >= tol:
                c = float(alphas[k]) * theta / math.sin(theta)
                tangent[k] += c
                tangent -= c * float(dots[k]) * mean
        size = _norm(gu, tangent)
        if size < tol:
            break
        mean = math.cos(size) * mean + math.sin(size) / size * tangent
        length = _norm(gu, mean)
        if length > tol:
            mean = mean / length
    scale = sum(w * float(n) for w, n in zip(weights, norms, strict=True))
    coefs = [0.0] * len(xs)
    for k, i in enumerate(valid):
        coefs[i] = scale * float(mean[k]) / float(norms[i])
    return _combine(xs, None, coefs, out)
