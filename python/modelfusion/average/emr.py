"""EMR merging (Huang et al., 2024: Elect, Mask & Rescale), as FusionBench 0.2.33 computes it, on
state dicts: from the task vectors τᵢ = θᵢ − θ₀ of every float tensor,

- elect: σ = sign(Σᵢ τᵢ) (a zero sum counts as negative), τ_u = σ · maxᵢ |τᵢ| over the τᵢ whose sign
  agrees with σ;
- mask: Mᵢ = (τᵢ·σ > 0);
- rescale: rᵢ = Σ_tensors mean|τᵢ| / Σ_tensors mean|Mᵢ ⊙ τ_u|;

and task i's model is θ₀ + rᵢ·Mᵢ ⊙ τ_u: one shared vector, one bit per element and one scalar per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ParameterError
from .state import State, StateLike, aligned


@dataclass
class EMR:
    base: State  # a copy of θ₀ (a model set to a task may overwrite the caller's)
    unified: State  # τ_u
    masks: list[State]  # Mᵢ, bool
    rescalers: list[float]  # rᵢ

    def task(self, i: int) -> State:
        """Task ``i``'s state dict: θ₀ + rᵢ·Mᵢ ⊙ τ_u (the base's own tensors where τ_u has none)."""
        if not 0 <= i < len(self.masks):
            raise ParameterError(f"task: expected an index in [0, {len(self.masks)}), got {i}")
        r = self.rescalers[i]
        return {
            k: (t + self.unified[k] * self.masks[i][k] * r).to(t.dtype) if k in self.unified else t.clone()
            for k, t in self.base.items()
        }


def emr_merge(base: StateLike, models: Sequence[StateLike]) -> EMR:
    """Elect, mask and rescale (see the module docstring); tensors that are not floats stay the base's."""
    n = len(models)
    if n == 0:
        raise ParameterError("models: expected at least one fine-tuned model, got none")
    states = aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(n)])
    ref = states[0]
    unified: State = {}
    masks: list[State] = [{} for _ in range(n)]
    scales = torch.zeros(n)
    masked = torch.zeros(n)
    for k, t0 in ref.items():
        if not t0.is_floating_point():
            continue
        taus = torch.stack([s[k].to(t0.dtype) - t0 for s in states[1:]])
        sign = torch.where(taus.sum(0) > 0, 1, -1).to(t0.dtype)
        agree = taus * sign > 0
        unified[k] = torch.where(agree, taus.abs(), 0).amax(0) * sign
        for i in range(n):
            masks[i][k] = agree[i]
            scales[i] += taus[i].abs().mean()
            masked[i] += (unified[k] * agree[i]).abs().mean()
    return EMR({k: t.detach().clone() for k, t in ref.items()}, unified, masks, (scales / masked).tolist())
