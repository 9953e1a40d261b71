"""Reference ``sparse_merge``: the general sparse task-vector merge; TIES, DARE, breadcrumbs and
DELLA are presets of it. Accumulates in float32 (float64 for float64 inputs).

For models i = 1..N with task vectors τᵢ = xᵢ − base (or xᵢ itself when base is None):

1. sparsify: a keep mask mᵢ per model
   - ``"magnitude"``: the kᵢ = ⌊densityᵢ·n⌋ largest |τᵢ| (ties: lowest flat index first);
   - ``"random"`` (DARE): Bernoulli(densityᵢ) from the counter-based hash (``random_mask``), the
     stream of model ``first_model + i`` (one model's draws alone, as in a call with all of them);
   - ``"magnitude_outliers"`` (breadcrumbs): drop the ⌊γᵢ·n⌋ largest, keep the next kᵢ
     (fewer dropped when kᵢ + ⌊γᵢ·n⌋ > n);
   - ``"della"``: Bernoulli(pᵢⱼ), pᵢⱼ = (densityᵢ − εᵢ) + 2εᵢ·(rⱼ − 1)/(m − 1), with rⱼ the rank
     (1 = smallest |τ|, ties by index) of the element along dim 1 (a 1-D tensor is one row of m);
   - ``"threshold"``: |τᵢ| ≥ thresholdᵢ (NaN counts as above every threshold, as in the ranking);
   - ``None``: keep everything.
2. rescale the kept values: ``"inverse_density"`` × 1/pᵢⱼ (their keep probability, densityᵢ for
   random and magnitude), ``"l1"`` × ‖τᵢ‖₁/‖mᵢ⊙τᵢ‖₁ (skipped when either is < 1e-7), or None.
   Call the result tᵢ.
3. consensus (sign election) on vᵢ = wᵢ·tᵢ (``elect_on="weighted"``) or vᵢ = tᵢ (``"unweighted"``):
   ``"sum"``: s = sign⁺(Σᵢ vᵢ); ``"count"``: s = sign⁺(Σᵢ sign(vᵢ)); sign⁺(0) = ``tie_sign`` (+1 as
   mergekit and PEFT; FusionBench's majority can make it −1). Model i takes part where
   sign(vᵢ) = s (a zero never agrees; where the tally is 0 and ``tie_sign`` is 0, no model does).
   ``None``: every model takes part everywhere.
4. combine the agreeing wᵢ·tᵢ: ``"sum"``; ``"max"``: s·max |wᵢ·tᵢ| (0 where none agrees);
   ``"mean_count"`` ÷ max(1, number agreeing);
   ``"mean_weight"`` ÷ Σ agreeing wᵢ (1 where that is 0; without consensus ÷ Σᵢ wᵢ, 1 where
   |Σᵢ wᵢ| < 1e-8).
5. out = base + λ·merged (or λ·merged without base), rounded once to the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .magnitude_prune import top_k_mask
from .random_mask import random_keep_mask, uniform24
from .weighted_sum import accumulation_dtype

L1_RESCALE_EPS = 1e-7
# magnitude_prune as a sparse merge of one input without base: the backends' arguments after
# (out, base, xs) — weights, sparsify, rescale, consensus, elect_on, combine, densities, gammas,
# epsilons, lam, seed, thresholds, tie_sign, first_model, masks — with k given apart.
PRUNE_OPTIONS = ([1.0], "magnitude", None, None, "weighted", "sum", [1.0], [0.0], [0.0], 1.0, 0, [0.0], 1, 0, [])


def _outlier_mask(tau: torch.Tensor, keep: int, drop_top: int) -> torch.Tensor:
    drop_top = min(drop_top, tau.numel() - keep)
    return top_k_mask(tau, drop_top + keep) & ~top_k_mask(tau, drop_top)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of each element (float32), ranked along dim 1 (1-D: one row)."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    m = rows.shape[1]
    keys = rows.abs().to(torch.float64)
    ranks = torch.argsort(torch.argsort(keys, dim=1, stable=True), dim=1).to(torch.float32)  # 0 = smallest
    rank_norm = ranks / (m - 1) if m > 1 else torch.zeros_like(ranks)
    probs = torch.tensor(density - epsilon, dtype=torch.float32) + rank_norm * torch.tensor(
        2 * epsilon, dtype=torch.float32
    )
    return probs.reshape(tau.shape)


def threshold_key(threshold: float, dtype: torch.dtype, keys16: bool) -> int:
    """The smallest magnitude key k with value ≥ ``threshold`` (the key space: float32 bits, or the
    16-bit inputs' own bits without a base), so that key ≥ k ⟺ |τ| ≥ threshold exactly."""
    space = dtype if keys16 else torch.float32
    value = torch.tensor(threshold, dtype=torch.float64).to(space)
    key = int(value.view(torch.int16 if keys16 else torch.int32)) & (0x7FFF if keys16 else 0x7FFFFFFF)
    return key + 1 if float(value) < threshold else key


def keep_mask_and_probability(
    tau, model: int, sparsify: str | None, density: float, gamma: float, epsilon: float, seed: int, threshold=0.0
):
    """(mask, keep probability: float or per-element float32 tensor) of one model's task vector."""
    n = tau.numel()
    if sparsify == "threshold":  # compared exactly (in float64), NaN kept
        return (tau.abs().double() >= threshold) | tau.isnan(), 1.0
    if sparsify is None:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device), 1.0
    if sparsify == "magnitude":
        return top_k_mask(tau, int(density * n)), density
    if sparsify == "magnitude_outliers":
        return _outlier_mask(tau, int(density * n), int(gamma * n)), density
    if sparsify == "random":
        return random_keep_mask(tau.shape, density, seed, model, tau.device), density
    if sparsify == "della":
        draws = uniform24(n, seed, model, tau.device).view(tau.shape)
        probs = della_probabilities(tau, density, epsilon)
        return draws.to(torch.float32) < torch.floor(probs * float(1 << 24)), probs
    raise ValueError(f"unknown sparsify {sparsify!r}")


def sparse_merge(
    base: torch.Tensor | None,
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: str | None,
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    rescale: str | None,
    consensus: str | None,
    elect_on: str,
    combine: str,
    lam: float,
    seed: int,
    masks: Sequence[torch.Tensor] | None = None,
    thresholds: Sequence[float] | None = None,
    tie_sign: int = 1,
    first_model: int = 0,
) -> torch.Tensor:
    """See the module docstring. ``masks`` (bool, one per model) replace step 1's masks when given."""
    dtype = xs[0].dtype
    acc = accumulation_dtype(dtype)
    b = base.to(acc) if base is not None else None
    kept = []
    for i, x in enumerate(xs):
        tau = x.to(acc) - b if b is not None else x.to(acc)
        if masks is not None:
            mask, prob = masks[i], densities[i]
        else:
            # The ranking uses τ in the precision it is computed in (x's own dtype when base is None).
            ranked = tau if b is not None else x
            threshold = thresholds[i] if thresholds else 0.0
            mask, prob = keep_mask_and_probability(
                ranked, first_model + i, sparsify, densities[i], gammas[i], epsilons[i], seed, threshold
            )
        t = torch.where(mask, tau, torch.zeros((), dtype=acc))
        if rescale == "inverse_density":
            t = t / (prob.to(acc) if isinstance(prob, torch.Tensor) else prob)
        elif rescale == "l1":
            before, after = tau.abs().sum(), t.abs().sum()
            if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
                t = t * (before / after)
        kept.append(t)

    agree = [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in kept]
    if consensus is not None:
        votes = [t * w if elect_on == "weighted" else t for t, w in zip(kept, weights, strict=True)]
        tally = sum(votes) if consensus == "sum" else sum(v.sign() for v in votes)
        majority = torch.where((tally > 0) | ((tally == 0) & (tie_sign > 0)), 1.0, -1.0).to(acc)
        agree = [v.sign() == majority for v in votes]
        if tie_sign == 0:
            agree = [a & (tally != 0) for a in agree]

    zero = torch.zeros((), dtype=acc)
    merged = torch.zeros(xs[0].shape, dtype=acc, device=xs[0].device)
    for t, w, a in zip(kept, weights, agree, strict=True):
        if combine == "max":
            merged = torch.maximum(merged, torch.where(a, (t * w).abs(), zero))
        else:
            merged += torch.where(a, t * w, zero)
    if combine == "max":
        merged = merged * majority
    elif combine == "mean_count":
        merged = merged / torch.clamp(sum(a.to(acc) for a in agree), min=1.0)
    elif combine == "mean_weight":
        if consensus is not None:
            divisor = sum(torch.where(a, torch.tensor(w, dtype=acc), zero) for a, w in zip(agree, weights, strict=True))
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
        else:
            total = sum(weights)
            merged = merged / (total if abs(total) >= 1e-8 else 1.0)
    out = merged * lam if lam != 1.0 else merged
    if b is not None:
        out = b + out
    return out.to(dtype)


def sign_tally(base: torch.Tensor, xs: Sequence[torch.Tensor], thresholds: Sequence[float]) -> tuple[int, int]:
    """TIES' election over the elements ``"threshold"`` keeps (float32 arithmetic): with
    s = Σᵢ kept τᵢ per element (summed in model order), returns (#(s > 0) − #(s < 0), the number
    of elements where s = 0 although some kept τᵢ ≠ 0, whose elected sign is therefore the tie's).
    FusionBench's majority sign is the sign of the first; only the second kind of element depends on it."""
    b = base.float()
    s = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    nonzero = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
    for x, threshold in zip(xs, thresholds, strict=True):
        tau = x.float() - b
        mask, _ = keep_mask_and_probability(tau, 0, "threshold", 1.0, 0.0, 0.0, 0, threshold)
        kept = torch.where(mask, tau, torch.zeros((), dtype=torch.float32))
        s += kept
        nonzero |= kept != 0
    return int((s > 0).sum()) - int((s < 0).sum()), int((nonzero & (s == 0)).sum())
