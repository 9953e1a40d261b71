"""Exact linear assignment: for each [n, m] cost (n <= m) the distinct columns perm[i] minimising
Σᵢ C[i, perm[i]] (maximising with ``maximize``). The oracle is SciPy's solver (a shortest
augmenting path method), one matrix at a time."""

import torch


def linear_assignment(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    """``cost`` [B, n, m] with n <= m -> int64 [B, n] (the column of each row)."""
    from scipy.optimize import linear_sum_assignment

    matrices = cost.detach().to("cpu", torch.float64).numpy()
    perms = [torch.from_numpy(linear_sum_assignment(c, maximize=maximize)[1]) for c in matrices]
    out = torch.stack(perms) if perms else torch.empty(0, cost.shape[1], dtype=torch.int64)
    return out.to(torch.int64).to(cost.device)
