"""Alignment benchmark work, shared by roofline.py (``--suite align``) and bench_align.py.

- permute_many over a Llama-7B layer (4 × 4096×4096 attention, 3 × 11008×4096 MLP; rows and
  columns permuted) against chained ``index_select``;
- sinkhorn, 100 iterations (tol=None), against a plain PyTorch log-domain loop and POT's
  ``ot.bregman.sinkhorn_log`` (given torch tensors, so it runs on POT's torch backend);
- linear_assignment against ``scipy.optimize.linear_sum_assignment``, cold and warm-started.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

import fusion_kernels as fk

LLAMA_LAYER = {"attn": (4, (4096, 4096)), "mlp": (3, (11008, 4096))}
SINKHORN_SHAPES = {
    "32x512x512": (32, 512, 512),
    "4x4096x4096": (4, 4096, 4096),
    "8x512x512": (8, 512, 512),  # the backward comparison's default
    "2x64x64": (2, 64, 64),  # smoke tests
}
SINKHORN_REG = 0.05
SINKHORN_ITERS = 100


def llama_layer(dtype: torch.dtype, scale: float = 1.0) -> tuple[list[torch.Tensor], list[dict]]:
    """A layer's weights (shapes scaled by ``scale``) and one {0: rows, 1: columns} spec each; the
    MLP's down projection is stored transposed (4096×11008), as in HF checkpoints."""
    g = torch.Generator().manual_seed(0)
    hidden, inter = int(4096 * scale), int(11008 * scale)
    p_hidden, p_inter = torch.randperm(hidden, generator=g), torch.randperm(inter, generator=g)
    tensors, specs = [], []
    for _ in range(4):
        tensors.append(torch.randn(hidden, hidden, generator=g).to(dtype))
        specs.append({0: p_hidden, 1: torch.randperm(hidden, generator=g)})
    for name in ("gate", "up", "down"):
        shape = (hidden, inter) if name == "down" else (inter, hidden)
        tensors.append(torch.randn(shape, generator=g).to(dtype))
        specs.append({0: p_hidden, 1: p_inter} if name == "down" else {0: p_inter, 1: p_hidden})
    return tensors, specs


def permute_impls(buffers: list[torch.Tensor] | None = None) -> dict:
    """Ours returning new tensors, ours into reused ``buffers`` (``out=``), chained index_select,
    and ``clone()`` (no permutation at all: what any new output costs, page faults included)."""

    def chained(tensors, specs):
        return [x.index_select(0, s[0]).index_select(1, s[1]) for x, s in zip(tensors, specs, strict=True)]

    impls = {"fusion_kernels": fk.permute_many, "index_select": chained, "clone": lambda t, s: [x.clone() for x in t]}
    if buffers is not None:
        impls["fusion_kernels out="] = lambda t, s: fk.permute_many(t, s, out=buffers)
    return impls


def sinkhorn_cost(shape: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(shape, generator=g)


def plain_sinkhorn(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """The loop a user writes: log-domain f/g updates with torch.logsumexp, uniform marginals."""
    batch, n, m = cost.shape
    log_a, log_b = (
        torch.full((batch, n), -torch.log(torch.tensor(float(n)))),
        torch.full((batch, m), -torch.log(torch.tensor(float(m)))),
    )
    f, g = torch.zeros(batch, n), torch.zeros(batch, m)
    for _ in range(iters):
        f = reg * (log_a - torch.logsumexp((g.unsqueeze(1) - cost) / reg, dim=2))
        g = reg * (log_b - torch.logsumexp((f.unsqueeze(2) - cost) / reg, dim=1))
    return torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - cost) / reg)


def sinkhorn_impls() -> dict:
    impls = {
        "fusion_kernels": lambda c: fk.sinkhorn(c, reg=SINKHORN_REG, tol=None, max_iter=SINKHORN_ITERS).plan,
        "torch loop": lambda c: plain_sinkhorn(c, SINKHORN_REG, SINKHORN_ITERS),
        "POT": None,
    }
    if importlib.util.find_spec("ot") is not None:
        import ot

        def pot(cost):
            n, m = cost.shape[-2:]
            a, b = torch.full((n,), 1.0 / n), torch.full((m,), 1.0 / m)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": stopThr=0 runs every iteration
                return torch.stack(
                    [
                        ot.bregman.sinkhorn_log(a, b, c, SINKHORN_REG, numItermax=SINKHORN_ITERS, stopThr=0.0)
                        for c in cost
                    ]
                )

        impls["POT"] = pot
    return impls


def assignment_cost(n: int, kind: str, seed: int = 2) -> torch.Tensor:
    """``randn``: i.i.d. normal costs. ``matching``: a weight-matching cost −A·Bᵀ between two
    layers' units with 512 input weights each, B a weakly correlated (0.05) permuted copy of A, so
    the planted permutation is buried in low-rank noise as between independently trained models;
    float64. ``matching float32``: the same product in float32, as weight matching forms it from
    float32 or bf16 weights."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(n, n, generator=g, dtype=torch.float64)
    a = torch.randn(n, 512, generator=g, dtype=torch.float64)
    rho = 0.05
    b = rho * a[torch.randperm(n, generator=g)] + (1 - rho**2) ** 0.5 * torch.randn(
        n, 512, generator=g, dtype=torch.float64
    )
    if kind == "matching float32":
        a, b = a.float(), b.float()
    return -(a @ b.T)


def nudged(cost: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """The next coordinate-descent sweep's cost: the same matrix with 5% noise."""
    g = torch.Generator().manual_seed(seed)
    return cost + 0.05 * cost.std() * torch.randn(cost.shape, generator=g, dtype=cost.dtype)


def scipy_assignment(cost: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    return torch.from_numpy(linear_sum_assignment(cost.numpy())[1])
