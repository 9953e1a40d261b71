"""Reference magnitude selection with a deterministic tie rule.

Elements rank by magnitude, largest first, compared as the bit patterns of |x| (NaN ranks above
+inf); among equal magnitudes the lower flat index ranks first. ``top_k_mask(x, k)`` keeps exactly
the k best-ranked elements, so no result depends on threads, blocks or sort stability.
"""

from __future__ import annotations

import torch

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Flat int64 keys ordered like |x| (the bit patterns of |x|; sign bit cleared)."""
    return x.abs().reshape(-1).view(_INT_VIEW[x.dtype]).to(torch.int64)


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k elements of largest |x| (ties: lowest flat index first), shape of ``x``."""
    n = x.numel()
    if k <= 0 or k >= n:
        return torch.full(x.shape, k > 0, dtype=torch.bool, device=x.device)
    keys = magnitude_keys(x)
    threshold = torch.kthvalue(keys, n - k + 1).values  # the k-th largest key
    above = keys > threshold
    equal = keys == threshold
    keep_equal = equal & (torch.cumsum(equal, 0) <= k - int(above.sum()))
    return (above | keep_equal).view(x.shape)


def magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (1 ≤ k ≤ numel) as a 0-dim tensor of x's dtype."""
    index = torch.kthvalue(magnitude_keys(x), x.numel() - k + 1).indices
    return x.reshape(-1)[index].abs()


def magnitude_prune(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with all but its k largest-magnitude elements set to zero."""
    return torch.where(top_k_mask(x, k), x, torch.zeros((), dtype=x.dtype, device=x.device))


def global_magnitude_threshold(models: list[list[torch.Tensor]], bases: list[torch.Tensor] | None, ks: list[int]):
    """Per model m, the ks[m]-th largest |x − base| (float32 arithmetic, ranked as float32 keys: NaN
    above inf) over all of its tensors ``models[m]`` (``bases[t]`` subtracted from tensor t), as
    float32 ``[M]``. Concatenates the keys: the reference, not for large models."""
    out = []
    for xs, k in zip(models, ks, strict=True):
        taus = [x.float() - (0 if bases is None else b.float()) for x, b in zip(xs, bases or xs, strict=True)]
        keys = torch.cat([t.abs().reshape(-1).view(torch.int32) for t in taus])
        out.append(torch.kthvalue(keys, keys.numel() - k + 1).values)
    return torch.stack(out).view(torch.float32) if out else torch.zeros(0)
