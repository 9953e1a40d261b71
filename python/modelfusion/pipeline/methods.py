"""One output tensor of each recipe method, on fusion_kernels (mergekit's semantics).

``merge_tensor(method, base, others, params, seed)``: ``base`` is the base model's tensor (None
for ``linear``), ``others`` the merged models' tensors in recipe order, ``params`` the
resolved parameters (per-model ones as lists in the order of ``others``). All but
``slerp`` and ``model_stock`` write into ``out`` when it is given (reused buffers: fresh memory is
slow to touch); those two ignore it.
"""

from __future__ import annotations

import torch

import fusion_kernels as fk
import fusion_kernels.compat.mergekit as fkm

from .recipe import GTA_METHODS

MODEL_STOCK_CHUNK = 1 << 22  # elements per step of model_stock's Gram matrix: bounds its scratch memory


def merge_tensor(method: str, base, others: list[torch.Tensor], params: dict, seed: int, out=None) -> torch.Tensor:
    if method == "linear":
        w = params["weight"]
        scale = 1 / sum(w) if params["normalize"] else 1.0
        return fk.weighted_sum(others, [x * scale for x in w], out=out)
    if method == "task_arithmetic":
        w = params["weight"]
        total = sum(w) if params["normalize"] and abs(sum(w)) >= 1e-8 else 1.0  # mergekit's guard
        return fk.task_arithmetic(base, others, [x * params["lambda"] / total for x in w], out=out)
    if method in GTA_METHODS:
        options = {k: params[k] for k in ("density", "gamma", "epsilon") if k in params}
        return fkm.generalized_task_arithmetic(
            method,
            base,
            others,
            params["weight"],
            normalize=params["normalize"],
            rescale=params["rescale"],
            lam=params["lambda"],
            seed=seed,
            out=out,
            **options,
        )
    if method == "slerp":
        return fk.slerp(base, others[0], params["t"])  # the whole tensor, as mergekit's run_merge batches it
    if method == "model_stock":
        return model_stock(base, others, filter_wise=params["filter_wise"])
    raise ValueError(f"unknown method {method!r}")


def model_stock(base: torch.Tensor, others: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al., 2024), as mergekit computes it: with offsets dᵢ = xᵢ − base and
    c the mean pairwise cosine of the dᵢ (per row when ``filter_wise``),
    t = N·c / (1 + (N − 1)·c)   (0 where the denominator vanishes),
    out = t·mean(xᵢ) + (1 − t)·base.
    The Gram matrix of the offsets is accumulated in float64 over chunks, so no offset is materialised."""
    n = len(others)
    rows = (base.shape[0] if base.dim() > 1 else 1) if filter_wise else 1
    flat = [x.reshape(rows, -1) for x in [base, *others]]
    gram = torch.zeros(rows, n, n, dtype=torch.float64, device=base.device)
    step = max(1, MODEL_STOCK_CHUNK // max(rows, 1))
    for start in range(0, flat[0].shape[1], step):
        b = flat[0][:, start : start + step].double()
        d = torch.stack([x[:, start : start + step].double() - b for x in flat[1:]], dim=1)
        gram += d @ d.transpose(1, 2)
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(
        [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    ).mean(0)
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, n * cos / torch.where(denominator.abs() < 1e-6, 1.0, denominator))
    if rows == 1:
        w = float(t)
        return fk.weighted_sum([base, *others], [1 - w] + [w / n] * n)
    shape = (rows,) + (1,) * (base.dim() - 1)
    out = (1 - t).reshape(shape) * base.double()
    for x in others:
        out += (t / n).reshape(shape) * x.double()
    return out.to(base.dtype)
