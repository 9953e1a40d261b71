"""RegMean (Jin et al., 2023): merge each linear layer so that it best matches every model's
outputs on that model's own inputs.

For a linear layer y = x·Wᵀ with inputs Xᵢ in model i and Gram matrices Gᵢ = XᵢᵀXᵢ,

    W* = argmin_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²   ⇒   W*ᵀ = (Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ Wᵢᵀ

solved with ``torch.linalg.solve`` in float64 (never an explicit inverse). ``alpha`` scales the
off-diagonal entries of each Gᵢ (α = 1: exact RegMean; α → 0: towards a per-input average).
Every other floating-point tensor (biases, norms, embeddings) is averaged uniformly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

import fusion_kernels as fk

from ..errors import ParameterError, StateDictError
from .state import State, StateLike, aligned, merge_states

FLUSH_ROWS = 1 << 14  # rows summed in the input's precision before they join the float64 total


def _inputs_of(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def collect_grams(
    model: nn.Module, data: Iterable, *, modules: Sequence[str] | None = None, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Σ over ``data``'s examples of xᵀx at the input of every ``nn.Linear`` (or the named ``modules``),
    in one pass with forward hooks: ``{module name: [in, in] float64}``. Products are
    summed in float32 (float64 for float64 inputs) over at most ``FLUSH_ROWS`` rows, then added to
    a float64 total, so long runs do not lose small contributions. ``data`` yields input batches
    or ``(inputs, labels)``; the model runs in eval mode, without grad."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears) if modules is None else list(modules)
    for name in names:
        if name not in linears:
            raise StateDictError(f"modules: {name!r} is not an nn.Linear of the model (have {sorted(linears)})")
    grams = {n: torch.zeros(linears[n].in_features, linears[n].in_features, dtype=torch.float64) for n in names}
    partial: dict[str, list] = {}  # name -> [running product in the input's precision, rows in it]

    def flush(name):
        acc, _ = partial.pop(name)
        grams[name] += acc.to(device="cpu", dtype=torch.float64)

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            if name not in partial:
                partial[name] = [torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device), 0]
            partial[name][0].addmm_(x.T, x)
            partial[name][1] += x.shape[0]
            if partial[name][1] >= FLUSH_ROWS:
                flush(name)

        return accumulate

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                model(_inputs_of(batch))
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for name in list(partial):
            flush(name)
    if batches == 0:
        raise ParameterError("data: expected at least one batch, got none")
    return grams


def regmean_merge(
    models: Sequence[StateLike], grams: Sequence[dict[str, torch.Tensor]], *, alpha: float = 1.0
) -> State:
    """RegMean over ``models`` with each model's ``collect_grams`` result (the same modules in each)."""
    n = len(models)
    if len(grams) != n:
        raise ParameterError(f"grams: expected {n} (one per model), got {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    states = aligned(models, [f"models[{i}]" for i in range(n)])
    layers = set(grams[0])
    for i, g in enumerate(grams[1:], 1):
        if set(g) != layers:
            raise StateDictError(f"grams[{i}]: expected the modules of grams[0] {sorted(layers)}, got {sorted(g)}")
    weight_of = {f"{name}.weight" if name else "weight": name for name in layers}  # "": the model itself
    for key, name in weight_of.items():
        w = states[0].get(key)
        size = grams[0][name].shape[0]
        if w is None or w.dim() != 2 or w.shape[1] != size:
            found = "no such tensor" if w is None else tuple(w.shape)
            raise StateDictError(f"grams: module {name!r} needs a weight {key!r} of shape [out, {size}], got {found}")

    def merge(key: str, xs: list[torch.Tensor]) -> torch.Tensor:
        name = weight_of.get(key)
        if name is None:
            return fk.weighted_average(xs)
        return _solve([g[name] for g in grams], xs, alpha).to(xs[0].dtype)

    return merge_states(states, merge)


def _solve(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(grams[0].shape[0], weights[0].shape[0], dtype=torch.float64)
    for g, w in zip(grams, weights, strict=True):
        g = g.to(torch.float64)
        if alpha != 1.0:
            g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        lhs += g
        rhs += g @ w.to(device="cpu", dtype=torch.float64).T
    # An input no model ever saw (an all-zero row) leaves its column of W undetermined: take the average.
    unseen = torch.diagonal(lhs) == 0
    if unseen.any():
        lhs[unseen, unseen] = 1.0
        rhs[unseen] = torch.stack([w.to(device="cpu", dtype=torch.float64).T[unseen] for w in weights]).mean(0)
    return torch.linalg.solve(lhs, rhs).T.to(weights[0].device)
