"""Drop-in replacements for ``peft.utils.merge_utils`` (PEFT 0.21), backed by fusion_kernels.

Same signatures and results as PEFT's functions, including its quirks:

- results follow dtype promotion with ``weights`` (bf16 task tensors with float32 weights give
  float32), so inputs are upcast first when the promoted dtype differs;
- ``prune`` with ``density >= 1`` warns and returns the tensor unchanged, ``density < 0`` raises;
- random pruning draws its masks with ``torch.bernoulli`` in PEFT's order, so a given
  ``torch.manual_seed`` gives PEFT's exact result.

Sign election is on the unweighted trimmed task tensors, ties go to +, and the disjoint merge
divides by the number of agreeing non-zero entries, all as PEFT does.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ..ops.magnitude_prune import magnitude_prune as _magnitude_prune
from ..ops.sparse_merge import sparse_merge as _sparse_merge
from ..ops.weighted_sum import weighted_sum as _weighted_sum

_CONSENSUS = {"total": "sum", "frequency": "count"}


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return _magnitude_prune(tensor, k=int(density * tensor.numel()))


def _bernoulli_masks(tensors: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    return [torch.bernoulli(torch.full_like(input=t, fill_value=density)).bool() for t in tensors]


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    (mask,) = _bernoulli_masks([tensor], density)
    pruned = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))
    return pruned / density if rescale else pruned


def _warn_no_pruning(density: float) -> None:
    warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=3)


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    if density >= 1:
        _warn_no_pruning(density)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    sign = tensor.sign()
    if method == "total":
        tally = tensor.sum(dim=0)
    elif method == "frequency":
        tally = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(tally >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    merged = (task_tensors * majority_sign_mask).sum(dim=0)
    return merged / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _promoted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    dtype = torch.result_type(task_tensors[0], weights)
    tensors = [t if t.dtype == dtype else t.to(dtype) for t in task_tensors]
    return tensors, [float(w) for w in weights.reshape(-1).tolist()]


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    tensors, w = _promoted(task_tensors, weights)
    return _weighted_sum(tensors, w)


def _sparse(task_tensors, weights, density, sparsify, consensus, combine, rescale=None, masks=None):
    tensors, w = _promoted(task_tensors, weights)
    if density >= 1:  # PEFT's prune: warn, prune nothing
        _warn_no_pruning(density)
        sparsify, density, masks = None, 1.0, None
    return _sparse_merge(
        None,
        tensors,
        w,
        sparsify=sparsify,
        density=density,
        rescale=rescale,
        consensus=consensus,
        elect_on="unweighted",
        combine=combine,
        masks=masks,
    )


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return _sparse(task_tensors, weights, density, "magnitude", None, "sum")


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    return _sparse(task_tensors, weights, density, "magnitude", _CONSENSUS[majority_sign_method], "mean_count")


def _dare(task_tensors, weights, density, consensus, combine) -> torch.Tensor:
    masks = _bernoulli_masks(task_tensors, density) if density < 1 else None  # PEFT's draw order
    return _sparse(task_tensors, weights, density, "random", consensus, combine, "inverse_density", masks)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return _dare(task_tensors, weights, density, None, "sum")


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    return _dare(task_tensors, weights, density, _CONSENSUS[majority_sign_method], "mean_count")
