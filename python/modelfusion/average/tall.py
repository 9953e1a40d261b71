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


def tall_mask_models(
    base: StateLike, models: Sequence[StateLike], tall_mask_lambda: float = 1.0, *, as_fusion_bench: bool = False
) -> tuple[list[State], list[State]]:
    """(masks, models): per task its mask mₜ (bool, float tensors only) and θ₀ + mₜ ⊙ τ_MT."""
    n = len(models)
    if n == 0:
        raise ParameterError("models: expected at least one fine-tuned model, got none")
    if not tall_mask_lambda >= 0:
        raise ParameterError(f"tall_mask_lambda: expected a number >= 0, got {tall_mask_lambda!r}")
    states = aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(n)])
    ref = states[0]
    masks: list[State] = [{} for _ in range(n)]
    out: list[State] = [{} for _ in range(n)]
    for k, t0 in ref.items():
        if not t0.is_floating_point():
            for o in out:
                o[k] = t0.clone()
            continue
        taus = [s[k].to(t0.dtype) - t0 for s in states[1:]]
        multi = torch.stack(taus).sum(0)
        for t, tau in enumerate(taus):
            own = (t0 - tau).abs() if as_fusion_bench else tau.abs()
            masks[t][k] = own > (multi - tau).abs() * tall_mask_lambda
            out[t][k] = t0 + masks[t][k] * multi
    return masks, out
