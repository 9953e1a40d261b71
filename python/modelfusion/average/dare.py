"""DARE (Yu et al., 2023) on whole models, as FusionBench 0.2.33 applies it: each task vector
τᵢ = θᵢ − θ₀ keeps every element with probability 1 − s (the sparsity ``s`` drops the rest),
the kept ones divided by 1 − s with ``rescale``; then task arithmetic (θ₀ + λ·Σ τ̃ᵢ) or TIES
(:func:`~modelfusion.average.ties_global` on the τ̃ᵢ).

Masks come from the engine's counter-based hash (``fusion_kernels.reference.random_keep_mask``,
seeded per tensor name and model: the same on every backend and run), or from ``masks``
(``{(model index, tensor name): bool tensor}``) to reproduce another library's draw. ``names``
limits the drop to those tensors (FusionBench's ``only_on_linear_weights``: the linear layers'
weights); the others keep their whole τᵢ.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

import fusion_kernels as fk
from fusion_kernels.methods import tensor_seed
from fusion_kernels.reference import random_keep_mask

from ..errors import ParameterError
from .state import State, StateLike, aligned, merge_states

Masks = Mapping[tuple[int, str], torch.Tensor]


def _check(sparsity: float, rescale: bool) -> None:
    if not 0.0 <= sparsity <= 1.0 or (rescale and sparsity == 1.0):
        raise ParameterError(f"sparsity_ratio: expected a fraction in [0, 1] (below 1 with rescale), got {sparsity!r}")


@dataclass(frozen=True)
class DareDrop:
    """``drop(i, name, τ)``: model ``i``'s task vector of tensor ``name`` after DARE (made by
    :func:`dare_drop`; :func:`~modelfusion.average.ties_global` reads its fields to run the drop on
    the engine, :meth:`engine` below, instead of calling it per pass)."""

    sparsity: float
    rescale: bool
    seed: int
    names: Collection[str] | None
    masks: Masks | None

    def __call__(self, i: int, name: str, tau: torch.Tensor) -> torch.Tensor:
        if self.names is not None and name not in self.names:
            return tau
        if self.masks is not None:
            keep = self.masks[(i, name)].to(tau.device)
        else:
            keep = random_keep_mask(tau.shape, 1.0 - self.sparsity, tensor_seed(self.seed, name), i, device=tau.device)
        kept = torch.where(keep, tau, 0)
        return kept / (1.0 - self.sparsity) if self.rescale else kept

    def engine(self, i: int, name: str, tau: torch.Tensor) -> torch.Tensor:
        """The same as calling it (the engine draws the same masks: model i's stream of the tensor's
        seed), in one fused pass written over ``tau`` (the caller's own temporary); ``masks`` given:
        the call itself."""
        if self.masks is not None or (self.names is not None and name not in self.names):
            return self(i, name, tau)
        return fk.sparse_merge(
            None,
            [tau],
            [1.0],
            sparsify="random",
            density=1.0 - self.sparsity,
            rescale="inverse_density" if self.rescale else None,
            consensus=None,
            combine="sum",
            seed=tensor_seed(self.seed, name),
            first_model=i,
            out=tau,
        )


def dare_drop(
    sparsity: float,
    *,
    rescale: bool = True,
    seed: int = 0,
    names: Collection[str] | None = None,
    masks: Masks | None = None,
) -> DareDrop:
    """``drop(i, name, τ)``: model ``i``'s task vector of tensor ``name`` after DARE."""
    _check(sparsity, rescale)
    return DareDrop(sparsity, rescale, seed, None if names is None else frozenset(names), masks)


def dare_task_arithmetic(
    base: StateLike,
    models: Sequence[StateLike],
    scaling_factor: float,
    sparsity: float,
    *,
    rescale: bool = True,
    seed: int = 0,
    names: Collection[str] | None = None,
    masks: Masks | None = None,
) -> State:
    """θ = θ₀ + λ·Σᵢ DARE(τᵢ): one fused sparse merge per tensor (the engine's DARE masks, or ``masks``)."""
    _check(sparsity, rescale)
    n = len(models)
    if n == 0:
        raise ParameterError("models: expected at least one fine-tuned model, got none")
    states = aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(n)])
    weights = [float(scaling_factor)] * n

    def one(name: str, xs: list[torch.Tensor]) -> torch.Tensor:
        if names is not None and name not in names:
            return fk.task_arithmetic(xs[0], xs[1:], weights)
        given = None if masks is None else [masks[(i, name)].to(xs[0].device) for i in range(n)]
        return fk.sparse_merge(
            xs[0],
            xs[1:],
            weights,
            sparsify="random",
            density=1.0 - sparsity,
            rescale="inverse_density" if rescale else None,
            consensus=None,
            combine="sum",
            seed=tensor_seed(seed, name),
            masks=given,
        )

    return merge_states(states, one)
