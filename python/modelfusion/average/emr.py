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

import fusion_kernels as fk

from ..errors import ParameterError
from .state import State, StateLike, aligned

PIECE = 1 << 16  # elements per step of the elementwise passes


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
    scales = torch.zeros(n, dtype=torch.float64)
    masked = torch.zeros(n, dtype=torch.float64)
    for k, t0 in ref.items():
        if not t0.is_floating_point():
            continue
        if all(s[k].dtype == torch.float32 for s in states):  # the engine: one pass
            unified[k], agree_all, sums = fk.emr_statistics(t0.detach(), [s[k].detach() for s in states[1:]])
            for i in range(n):
                masks[i][k] = agree_all[i]
            scales += sums[:, 0].cpu() / max(t0.numel(), 1)
            masked += sums[:, 1].cpu() / max(t0.numel(), 1)
            continue
        flat0, flats = t0.detach().reshape(-1), [s[k].detach().to(t0.dtype).reshape(-1) for s in states[1:]]
        unified[k] = torch.empty_like(t0)
        flat_u = unified[k].view(-1)
        agree_all = torch.empty((n, t0.numel()), dtype=torch.bool, device=t0.device)
        abs_sums, masked_sums = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for start in range(0, t0.numel(), PIECE):  # elementwise: piece by piece, its temporaries in cache
            piece = slice(start, start + PIECE)
            taus = torch.stack([f[piece] for f in flats]).sub_(flat0[piece])
            sign = torch.where(taus.sum(0) > 0, 1, -1).to(t0.dtype)
            agree = taus * sign > 0
            u = torch.where(agree, taus.abs(), 0).amax(0) * sign
            flat_u[piece] = u
            agree_all[:, piece] = agree
            abs_sums += taus.abs().sum(1, dtype=torch.float64).cpu()
            masked_sums += (u * agree).abs().sum(1, dtype=torch.float64).cpu()
        for i in range(n):
            masks[i][k] = agree_all[i].view(t0.shape)
        # per tensor the mean |τᵢ| and mean |Mᵢ ⊙ τ_u| (FusionBench's), summed over the tensors
        scales += abs_sums / max(t0.numel(), 1)
        masked += masked_sums / max(t0.numel(), 1)
    return EMR({k: t.detach().clone() for k, t in ref.items()}, unified, masks, (scales / masked).tolist())
