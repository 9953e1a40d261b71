"""TALL masks (Wang et al., 2024: "Localizing Task Information for Improved Model Merging and
Compression"), on state dicts: with τₜ = θₜ − θ₀ and the multi-task vector τ_MT = Σₜ τₜ, task t's
mask keeps the elements where its own vector outweighs what the others add,

    mₜ = |τₜ| > λ·|τ_MT − τₜ|        (the paper: |θ₀ − θₜ| > λ·|θ_MT − θₜ|)

and task t's model is θ₀ + mₜ ⊙ τ_MT: one shared vector and one bit per element and task.

FusionBench 0.2.33 compares |θ₀ − τₜ| instead of |τₜ| (it hands its mask function the task vector
where the fine-tuned weights belong); ``as_fusion_bench=True`` reproduces that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ParameterError
from .state import State, StateLike, aligned


def _states(base: StateLike, models: Sequence[StateLike], tall_mask_lambda: float) -> list:
    if len(models) == 0:
        raise ParameterError("models: expected at least one fine-tuned model, got none")
    if not tall_mask_lambda >= 0:
        raise ParameterError(f"tall_mask_lambda: expected a number >= 0, got {tall_mask_lambda!r}")
    return aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(len(models))])


def _masks(t0: torch.Tensor, taus: list[torch.Tensor], tall_mask_lambda: float, as_fusion_bench: bool) -> tuple:
    """Every task's mask of one tensor, and τ_MT."""
    multi = torch.stack(taus).sum(0)
    owns = [(t0 - tau).abs() if as_fusion_bench else tau.abs() for tau in taus]
    return [own > (multi - tau).abs() * tall_mask_lambda for own, tau in zip(owns, taus, strict=True)], multi


def tall_mask_models(
    base: StateLike, models: Sequence[StateLike], tall_mask_lambda: float = 1.0, *, as_fusion_bench: bool = False
) -> tuple[list[State], list[State]]:
    """(masks, models): per task its mask mₜ (bool, float tensors only) and θ₀ + mₜ ⊙ τ_MT."""
    states = _states(base, models, tall_mask_lambda)
    ref, n = states[0], len(models)
    masks: list[State] = [{} for _ in range(n)]
    out: list[State] = [{} for _ in range(n)]
    for k, t0 in ref.items():
        if not t0.is_floating_point():
            for o in out:
                o[k] = t0.clone()
            continue
        task_masks, multi = _masks(t0, [s[k].to(t0.dtype) - t0 for s in states[1:]], tall_mask_lambda, as_fusion_bench)
        for t, mask in enumerate(task_masks):
            masks[t][k] = mask
            out[t][k] = t0 + mask * multi
    return masks, out


def tall_mask_into(
    base: StateLike,
    models: Sequence[StateLike],
    targets: Sequence[State],
    tall_mask_lambda: float = 1.0,
    *,
    as_fusion_bench: bool = False,
) -> None:
    """Writes task t's model θ₀ + mₜ ⊙ τ_MT into ``targets[t]`` (state dicts with the base's
    names, say copies of the base model's own), tensor by tensor, keeping no mask: the memory it
    adds is one tensor's work, not T models and T masks beside the targets."""
    states = _states(base, models, tall_mask_lambda)
    if len(targets) != len(models):
        raise ParameterError(f"targets: expected one state dict per model ({len(models)}), got {len(targets)}")
    for k, t0 in states[0].items():
        if not t0.is_floating_point():
            for target in targets:
                target[k].copy_(t0)
            continue
        task_masks, multi = _masks(t0, [s[k].to(t0.dtype) - t0 for s in states[1:]], tall_mask_lambda, as_fusion_bench)
        for target, mask in zip(targets, task_masks, strict=True):
            target[k].copy_(t0 + mask * multi)
