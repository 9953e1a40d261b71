"""Permutations along dims: out[i₀, …, iₖ] = x[p₀[i₀], …, pₖ[iₖ]], identity on dims without one."""

import torch


def permute(x: torch.Tensor, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """Gather ``x`` by ``perms[d]`` along each dim ``d`` (one ``index_select`` per dim); always a new tensor."""
    out = x
    for dim, perm in perms.items():
        out = out.index_select(dim, perm)
    return out.clone() if out is x else out


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """q with q[perm[i]] = i, so gathering by q undoes gathering by perm."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inverse
