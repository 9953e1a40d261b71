"""Fisher merging (Matena & Raffel, 2022): a diagonal Fisher per model, then a Fisher-weighted average.

    F_θ = E_x E_y [ (∂ log p(y | x; θ) / ∂θ)² ]      (per parameter, averaged over examples)
    θ*  = Σᵢ wᵢ·Fᵢ·θᵢ / (Σᵢ wᵢ·Fᵢ + eps)              (fusion_kernels.fisher_merge)

``empirical``: y is the example's label; ``sampled``: y ~ p(· | x; θ), the true Fisher's estimate.
No backward per example. When every trainable parameter belongs to an ``nn.Linear`` that sees one
row per example, the per-example gradient of W is δₙ·xₙᵀ (δₙ: the gradient at the layer's output),
so Σₙ gₙ² = (δ²)ᵀ·(x²): one batched backward and one matrix product per layer. Otherwise
per-example gradients come from ``torch.func`` (``vmap`` over ``grad``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fusion_kernels as fk

from ..errors import ParameterError, StateDictError
from .state import State, StateLike, aligned, merge_states

KINDS = ("empirical", "sampled")


def _batches(data: Iterable, max_batches: int | None):
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def estimate_fisher(
    model: nn.Module,
    data: Iterable,
    *,
    kind: str = "empirical",
    max_batches: int | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
) -> State:
    """The diagonal Fisher of a classifier (``model(x)`` returns logits ``[B, C]``) for each trainable
    parameter, averaged over the examples of ``data`` (an iterable of ``(inputs, labels)`` batches).

    The model runs in eval mode (restored after). ``chunk_size`` bounds how many examples' gradients
    are held at once (default: the whole batch). ``seed`` drives the labels of ``kind="sampled"``.
    """
    if kind not in KINDS:
        raise ParameterError(f"kind: expected one of {KINDS}, got {kind!r}")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise StateDictError("model: has no trainable parameters to estimate a Fisher for")
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def log_likelihood(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits.float(), dim=-1)[0].gather(0, y.unsqueeze(0))[0]

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0), chunk_size=chunk_size)
    linears = _linear_layers(model, params)
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    examples = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(data, max_batches):
            if kind == "sampled":
                with torch.no_grad():
                    probs = torch.softmax(model(x).float(), dim=-1).cpu()
                y = torch.multinomial(probs, 1, generator=generator)[:, 0].to(x.device)
            if linears is None or not _add_linear_fisher(model, linears, x, y.long(), fisher):
                for k, g in per_example(params, x, y.long()).items():
                    fisher[k] += g.float().pow(2).sum(0)
            examples += x.shape[0]
    finally:
        model.train(was_training)
    if examples == 0:
        raise ParameterError("data: expected at least one batch of examples, got none")
    return {k: (f / examples).to(params[k].dtype) for k, f in fisher.items()}


def _linear_layers(model: nn.Module, params: dict) -> dict[str, nn.Linear] | None:
    """The model's ``nn.Linear``s by name when they own every trainable parameter, else None."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {f"{name}.{p}" if name else p for name, m in linears.items() for p, _ in m.named_parameters()}
    return linears if set(params) <= owned else None


def _add_linear_fisher(model, linears: dict[str, nn.Linear], x, y, fisher) -> bool:
    """Adds this batch's Σₙ gₙ² of every linear parameter; False (nothing added) when a layer did
    not see exactly one 2-D input with one row per example."""
    seen: dict[str, tuple] = {}
    calls = {"ok": True}

    def record(name):
        def hook(_module, args, output):
            if name in seen or args[0].dim() != 2 or args[0].shape[0] != x.shape[0]:
                calls["ok"] = False
            seen[name] = (args[0].detach(), output)

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
            used = [name for name in linears if name in seen]
            if not calls["ok"] or not used:
                return False
            total = torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).sum()
            deltas = torch.autograd.grad(total, [seen[name][1] for name in used], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for name, delta in zip(used, deltas, strict=True):
        if delta is None:
            continue
        prefix = f"{name}." if name else ""
        d2, x2 = delta.float().pow(2), seen[name][0].float().pow(2)
        if prefix + "weight" in fisher:
            fisher[prefix + "weight"] += d2.T @ x2
        if prefix + "bias" in fisher:
            fisher[prefix + "bias"] += d2.sum(0)
    return True


def fisher_merge(
    models: Sequence[StateLike],
    fishers: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    eps: float = 0.0,
) -> State:
    """θ* = Σᵢ wᵢ·Fᵢ·θᵢ / (Σᵢ wᵢ·Fᵢ + eps) for every tensor with a Fisher in all ``fishers``;
    the weighted average Σᵢ wᵢ·θᵢ / Σᵢ wᵢ for floating-point tensors with none (buffers)."""
    n = len(models)
    if len(fishers) != n:
        raise ParameterError(f"fishers: expected {n} (one per model), got {len(fishers)}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ParameterError(f"weights: expected {n} numbers (one per model), got {len(w)}")
    states = aligned(models, [f"models[{i}]" for i in range(n)])
    for i, f in enumerate(fishers):
        for key, value in f.items():
            if key not in states[0] or value.shape != states[0][key].shape:
                shape = tuple(states[0][key].shape) if key in states[0] else "no such tensor"
                raise StateDictError(
                    f"fishers[{i}][{key!r}]: expected a tensor like the models' ({shape}), got {tuple(value.shape)}"
                )

    def merge(name: str, xs: list[torch.Tensor]) -> torch.Tensor:
        have = [name in f for f in fishers]
        if not any(have):
            return fk.weighted_average(xs, w)
        if not all(have):
            raise StateDictError(f"fishers: {name!r} has a Fisher for some models only ({have})")
        fs = [f[name].to(dtype=xs[0].dtype, device=xs[0].device).contiguous() for f in fishers]
        return fk.fisher_merge(xs, fs, w, eps=eps)

    return merge_states(states, merge)
