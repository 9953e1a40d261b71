"""Model soups (Wortsman et al., 2022) and WiSE-FT: plain and greedy weight averages."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fusion_kernels as fk

from ..errors import ParameterError
from .state import State, StateLike, aligned, merge_states


def _names(n: int) -> list[str]:
    return [f"models[{i}]" for i in range(n)]


def soup_weights(weights: Sequence[float], n: int | None = None, *, normalize=True) -> list[float]:
    """The factors wᵢ (÷ Σ wᵢ when ``normalize``) checked: ``n`` finite numbers (len(weights) if None)."""
    w = [float(x) for x in weights]
    n = len(w) if n is None else n
    if len(w) != n or not all(math.isfinite(x) for x in w):
        raise ParameterError(f"weights: expected {n} finite numbers (one per model), got {weights!r}")
    if normalize:
        total = sum(w)
        if abs(total) < 1e-12:
            raise ParameterError(f"weights: expected a nonzero sum to normalize by, got {w}")
        w = [x / total for x in w]
    return w


def weighted_soup(models: Sequence[StateLike], weights: Sequence[float] | None = None, *, normalize=True) -> State:
    """θ = Σᵢ wᵢ·θᵢ, divided by Σᵢ wᵢ when ``normalize`` (default weights: all 1)."""
    n = len(models)
    w = soup_weights([1.0] * n if weights is None else weights, n, normalize=normalize)
    return merge_states(aligned(models, _names(n)), lambda _, xs: fk.weighted_sum(xs, w))


def uniform_soup(models: Sequence[StateLike]) -> State:
    """θ = (1/N)·Σᵢ θᵢ."""
    return weighted_soup(models)


def wise_ft(zero_shot: StateLike, fine_tuned: StateLike, alpha: float = 0.5) -> State:
    """WiSE-FT (Wortsman et al., 2022): θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned, α in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    states = aligned([zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
    return merge_states(states, lambda _, xs: fk.weighted_sum(xs, [1.0 - alpha, alpha]))


@dataclass
class GreedySoup:
    state: State
    ingredients: list[int]  # indices into the models, in the order they were added
    score: float  # the soup's validation score
    scores: list[float]  # each model's own validation score


def greedy_soup(
    models: Sequence[StateLike], evaluate: Callable[[State], float], scores: Sequence[float] | None = None
) -> GreedySoup:
    """Greedy soup: models sorted by their validation score (``evaluate``, higher is better, or the
    given ``scores``); starting from the best, each next model is added to the uniform soup only
    if the soup's score does not drop. Never worse on the validation set than the best model."""
    states = aligned(models, _names(len(models)))
    own = [float(evaluate(s)) for s in states] if scores is None else [float(s) for s in scores]
    if len(own) != len(states):
        raise ParameterError(f"scores: expected {len(states)} numbers (one per model), got {len(own)}")
    order = sorted(range(len(states)), key=lambda i: -own[i])
    chosen, best = [order[0]], own[order[0]]
    soup = uniform_soup([states[order[0]]])  # a copy: results never share the callers' tensors
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in chosen + [i]])
        score = float(evaluate(candidate))
        if score >= best:
            chosen, best, soup = chosen + [i], score, candidate
    return GreedySoup(state=soup, ingredients=chosen, score=best, scores=own)


def model_stock_by_angle(base: StateLike, models: Sequence[StateLike], ignore_keys: Sequence[str] = ()) -> State:
    """Model Stock (Jang et al., 2024) as FusionBench 0.2.33 computes it, per tensor: θ̄ the mean of
    the k models, φ the angle between two task vectors θᵢ − θ₀ averaged over all pairs (mergekit's
    ``model_stock`` averages the cosines instead), r = k·cos φ / ((k − 1)·cos φ + 1),
    θ = r·θ̄ + (1 − r)·θ₀. Tensors in ``ignore_keys`` take θ̄."""
    k = len(models)
    if k < 2:
        raise ParameterError(f"models: Model Stock needs at least 2 fine-tuned models, got {k}")
    states = aligned([base, *models], ["base", *_names(k)])
    ignore = set(ignore_keys)
    return merge_states(states, lambda name, xs: model_stock_by_angle_tensor(xs, name in ignore))


def model_stock_by_angle_tensor(xs: list[torch.Tensor], ignore: bool = False, out: torch.Tensor | None = None):
    """One tensor of :func:`model_stock_by_angle`, ``xs = [θ₀, θ₁, …, θₖ]`` (k ≥ 2), into ``out``
    where given (it may be θ₀: the dot products are taken before it is written)."""
    w0, fine = xs[0], xs[1:]
    k = len(fine)
    if ignore:
        return fk.weighted_average(fine, out=out)
    eps = 1e-8  # FusionBench's, in the cosine's and the ratio's denominators
    gram = fk.gram(fine, w0)[0]  # the task vectors' dot products in one pass (float64 sums)
    angles = [
        math.degrees(math.acos(max(-1.0, min(1.0, gram[i, j].item() / (math.sqrt(gram[i, i] * gram[j, j]) + eps)))))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = math.cos(math.radians(sum(angles) / len(angles)))
    r = k * cos / ((k - 1) * cos + 1 + eps)
    return fk.weighted_sum([*fine, w0], [r / k] * k + [1.0 - r], out=out)  # r·θ̄ + (1 − r)·θ₀ in one pass
