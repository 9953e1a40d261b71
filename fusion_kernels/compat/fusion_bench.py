"""FusionBench 0.2.33's merging classes on fusion_kernels.

``install()`` gives ``SimpleAverageAlgorithm``, ``WeightedAverageAlgorithm``,
``TaskArithmeticAlgorithm``, ``TiesMergingAlgorithm`` and the DARE classes (``DareSimpleAverage``,
``DareTaskArithmetic``, ``DareTiesMerging``) a ``run`` that computes the same state dict on the
engine — one fused pass per tensor instead of a new tensor per key and operation, and TIES without
its ``[N, D]`` flattening (:func:`ties_state`: model-wide thresholds in one sweep) — and hands every
other case to FusionBench's own ``run``: pools of ``LazyStateDict`` models, tensors that are not
float32, T5's shared-embedding keys, DARE on models with buffers or frozen parameters.
``uninstall()`` restores them. Results equal FusionBench's within float32 rounding (the sums are
formed in another order); DARE draws FusionBench's masks, ``torch.rand_like(τ) > sparsity`` in its
order from torch's global generator, so a seeded run gives the same model with and without
``install()``. fusion-bench is imported by ``install()`` only.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping, Sequence

import torch

from ..ops.magnitude_prune import global_magnitude_threshold
from ..ops.sparse_merge import sign_tally, sparse_merge
from ..ops.task_arithmetic import task_arithmetic
from ..ops.weighted_sum import weighted_sum

__all__ = ["install", "installed", "ties_state", "uninstall"]

State = dict[str, torch.Tensor]


def ties_state(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    k: int,
    merge_func: str,
    scaling_factor: float,
    task_vectors: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> State:
    """FusionBench's TIES over the float32 tensors ``keys``, as ``base[k] + λ·merged``: keep each
    model's |τᵢ| ≥ its k-th largest over all ``keys`` (:func:`~fusion_kernels.global_magnitude_threshold`,
    one sweep for every model), elect σ = sign(Σᵢ kept τᵢ) with FusionBench's majority where it is 0
    (:func:`~fusion_kernels.sign_tally`; a zero majority keeps the negatives), combine the agreeing
    by ``sum``, ``mean`` or ``max`` (one fused :func:`~fusion_kernels.sparse_merge` per tensor).
    ``task_vectors``: the τᵢ themselves (e.g. after DARE) in place of ``models`` − ``base``."""
    n = len(models) if task_vectors is None else len(task_vectors)
    if task_vectors is None:
        inputs = {key: [m[key] for m in models] for key in keys}
        origin = {key: base[key] for key in keys}
    else:
        inputs = {key: [tv[key] for tv in task_vectors] for key in keys}
        origin = {key: torch.zeros_like(base[key]) for key in keys}
    per_model = [[inputs[key][i] for key in keys] for i in range(n)]
    bases = None if task_vectors is not None else [origin[key] for key in keys]
    cuts = [float(c) for c in global_magnitude_threshold(per_model, k, base=bases)]
    balance = sum(sign_tally(origin[key], inputs[key], cuts)[0] for key in keys)
    # FusionBench's σ where the tally is 0 is the majority sign(balance); σ = 0 selects the negatives
    # (its agreement test is σ > 0 ? τ > 0 : τ < 0) and zeroes max's σ·max|τ|
    tie = 1 if balance > 0 else -1 if balance < 0 or merge_func != "max" else 0
    merged = {}
    for key in keys:
        value = sparse_merge(
            None if task_vectors is not None else base[key],
            inputs[key],
            [1.0] * n,
            sparsify="threshold",
            threshold=cuts,
            consensus="sum",
            elect_on="unweighted",
            combine={"sum": "sum", "mean": "mean_count", "max": "max"}[merge_func],
            lam=scaling_factor,
            tie_sign=tie,
        )
        merged[key] = value if task_vectors is None else value.add_(base[key])  # θ₀ + λ·τ, as FusionBench adds
    return merged


# --- the patched run() methods: each returns None when the pool is not one it handles ---


def _float32_states(states: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    first = states[0]
    return all(
        s.keys() == first.keys()
        and all(
            t.dtype == torch.float32 and t.shape == first[k].shape and t.device == first[k].device for k, t in s.items()
        )
        for s in states
    )


def _pool(modelpool):
    """FusionBench's BaseModelPool of ``modelpool`` (a pool, or a dict of models)."""
    from fusion_bench.modelpool import BaseModelPool

    return modelpool if isinstance(modelpool, BaseModelPool) else BaseModelPool(modelpool)


def _models(modelpool, with_pretrained: bool):
    pool = _pool(modelpool)
    names = list(pool.model_names)
    models = [pool.load_model(name) for name in names]
    pretrained = pool.load_model("_pretrained_") if with_pretrained else None
    if not all(isinstance(m, torch.nn.Module) for m in [*models, *([pretrained] if with_pretrained else [])]):
        return None
    if getattr(models[0], "_fusion_bench_target_modules", None) is not None:
        return None
    return pretrained, models


def _simple_average(algorithm, modelpool):
    loaded = _models(modelpool, with_pretrained=False)
    if loaded is None:
        return None
    _, models = loaded
    states = [m.state_dict() for m in models]
    if not _float32_states(states):
        return None
    w = [1.0 / len(states)] * len(states)
    merged = {k: weighted_sum([s[k] for s in states], w) for k in states[0]}
    target = models[0] if algorithm.inplace else copy.deepcopy(models[0])
    target.load_state_dict(merged)
    return target


def _weighted_average(algorithm, modelpool):
    loaded = _models(modelpool, with_pretrained=False)
    if loaded is None:
        return None
    _, models = loaded
    weights = [float(w) for w in algorithm.weights]
    if len(weights) != len(models):
        return None  # FusionBench's run raises its own error
    if algorithm.normalize:
        weights = [w / sum(weights) for w in weights]
    states = [m.state_dict() for m in models]
    if not _float32_states(states):
        return None
    models[0].load_state_dict({k: weighted_sum([s[k] for s in states], weights) for k in states[0]})
    return models[0]


def _task_arithmetic(algorithm, modelpool):
    loaded = _models(modelpool, with_pretrained=True)
    if loaded is None:
        return None
    pretrained, models = loaded
    base, states = pretrained.state_dict(), [m.state_dict() for m in models]
    if not _float32_states([base, *states]):
        return None
    lam = float(algorithm.config.scaling_factor)
    merged = {k: task_arithmetic(base[k], [s[k] for s in states], [lam] * len(states)) for k in base}
    target = pretrained if algorithm.inplace else copy.deepcopy(pretrained)
    target.load_state_dict(merged)
    return target


def _ties_settings(
    base: Mapping[str, torch.Tensor], threshold: float, remove_keys, merge_func: str
) -> tuple[list[str], int, str] | None:
    """FusionBench's TIES keys, k (its ``threshold`` as the kept fraction of all their elements) and
    merge_func; None for what its own run handles (other merge_funcs, T5's shared embedding)."""
    remove_keys = list(remove_keys or [])
    keep = threshold / 100 if threshold > 1 else threshold
    if merge_func not in ("sum", "mean", "max") or not 0 <= keep < 1 or "transformer.shared.weight" in base:
        return None
    keys = sorted(k for k in base if k not in remove_keys)
    total = sum(base[k].numel() for k in keys)
    return None if total == 0 else (keys, int(total * keep) + 1, merge_func)


def _ties(algorithm, modelpool, **kwargs):
    loaded = _models(modelpool, with_pretrained=True)
    if loaded is None:
        return None
    pretrained, models = loaded
    base, states = pretrained.state_dict(), [m.state_dict() for m in models]
    config = algorithm.config
    settings = _ties_settings(base, algorithm.threshold, config.get("remove_keys", []), config.get("merge_func", "sum"))
    if not _float32_states([base, *states]) or settings is None:
        return None
    merged = ties_state(base, states, *settings, float(algorithm.scaling_factor))
    pretrained.load_state_dict({k: merged.get(k, v) for k, v in base.items()})
    return pretrained


def _dare_pool(modelpool):
    """FusionBench's DARE pool, loaded in its order (pretrained first), as (pretrained, models,
    their state dicts): None unless every state-dict entry is a float32 parameter that requires
    grad (its DARE subtracts parameters only, and draws for frozen ones too)."""
    pool = _pool(modelpool)
    pretrained = pool.load_model("_pretrained_")
    models = [pool.load_model(name) for name in pool.model_names]
    everything = [pretrained, *models]
    if not models or not all(isinstance(m, torch.nn.Module) for m in everything):
        return None
    if getattr(models[0], "_fusion_bench_target_modules", None) is not None:
        return None
    states = [m.state_dict() for m in everything]
    params = [dict(m.named_parameters()) for m in everything]
    only_params = all(s.keys() == p.keys() for s, p in zip(states, params, strict=True))
    if not _float32_states(states) or not only_params or not all(t.requires_grad for p in params for t in p.values()):
        return None
    return pretrained, models, states


def _dare_masks(models, only_on_linear_weights: bool, sparsity: float) -> list[dict[str, torch.Tensor]]:
    """FusionBench's DARE masks: per model, for each parameter it drops (every one, or the weights
    of nn.Linear modules) in its order, ``torch.rand_like(τ) > sparsity`` from torch's generator."""
    masks = []
    for model in models:
        params = dict(model.named_parameters())
        if only_on_linear_weights:
            linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            names = [f"{n}.weight" if n else "weight" for n in linear]
        else:
            names = list(params)
        masks.append({name: torch.rand_like(params[name]) > sparsity for name in names})
    return masks


def _dare_sparsity(algorithm) -> float | None:
    s = float(algorithm.sparsity_ratio)
    return s if 0 <= s < 1 else None  # FusionBench's own run asserts (s > 1) or divides by 0 (s = 1)


def _dare_task_arithmetic(algorithm, modelpool, scaling_factor: float | None = None):
    sparsity = _dare_sparsity(algorithm)
    loaded = None if sparsity is None else _dare_pool(modelpool)
    if loaded is None:
        return None
    pretrained, models, (base, *states) = loaded
    only_linear = getattr(algorithm, "only_on_linear_weights", getattr(algorithm, "only_on_linear_weight", False))
    masks = _dare_masks(models, bool(only_linear), sparsity)
    lam = float(algorithm.scaling_factor if scaling_factor is None else scaling_factor)
    n, merged = len(states), {}
    for key in base:
        inputs = [s[key] for s in states]
        if key in masks[0]:  # θ₀ + λ·Σᵢ mᵢ·τᵢ (÷ (1 − sparsity) with rescale)
            merged[key] = sparse_merge(
                base[key],
                inputs,
                [1.0] * n,
                sparsify=None,
                masks=[m[key] for m in masks],
                density=1.0 - sparsity,
                rescale="inverse_density" if getattr(algorithm, "rescale", True) else None,  # its default
                consensus=None,
                combine="sum",
                lam=lam,
            )
        else:
            merged[key] = task_arithmetic(base[key], inputs, [lam] * n)
    pretrained.load_state_dict(merged)
    return pretrained


def _dare_simple_average(algorithm, modelpool):
    pool = _pool(modelpool)
    return _dare_task_arithmetic(algorithm, pool, scaling_factor=1 / len(pool.model_names))


def _dare_ties(algorithm, modelpool):
    sparsity = _dare_sparsity(algorithm)
    loaded = None if sparsity is None else _dare_pool(modelpool)
    if loaded is None:
        return None
    pretrained, models, (base, *states) = loaded
    settings = _ties_settings(base, algorithm.threshold, algorithm.remove_keys, algorithm.merge_func)
    if settings is None:
        return None
    masks = _dare_masks(models, bool(algorithm.only_on_linear_weights), sparsity)
    task_vectors = []
    for state, mask in zip(states, masks, strict=True):  # FusionBench's τᵢ·mᵢ / (1 − sparsity)
        tv = {}
        for key in base:
            tau = state[key] - base[key]
            if key in mask:
                tau = tau * mask[key]
                if algorithm.rescale:
                    tau = tau / (1 - sparsity)
            tv[key] = tau
        task_vectors.append(tv)
    merged = ties_state(base, states, *settings, float(algorithm.scaling_factor), task_vectors=task_vectors)
    pretrained.load_state_dict({k: merged.get(k, v) for k, v in base.items()})
    return pretrained


# FusionBench module, class, our run: the classes install() routes.
ROUTES: list[tuple[str, str, Callable]] = [
    ("fusion_bench.method.simple_average", "SimpleAverageAlgorithm", _simple_average),
    ("fusion_bench.method.weighted_average.weighted_average", "WeightedAverageAlgorithm", _weighted_average),
    ("fusion_bench.method.task_arithmetic.task_arithmetic", "TaskArithmeticAlgorithm", _task_arithmetic),
    ("fusion_bench.method.ties_merging.ties_merging", "TiesMergingAlgorithm", _ties),
    ("fusion_bench.method.dare.simple_average", "DareSimpleAverage", _dare_simple_average),
    ("fusion_bench.method.dare.task_arithmetic", "DareTaskArithmetic", _dare_task_arithmetic),
    ("fusion_bench.method.dare.ties_merging", "DareTiesMerging", _dare_ties),
]
_originals: dict[type, Callable] = {}


def _routed(cls: type, ours: Callable, original: Callable) -> Callable:
    def run(self, modelpool, **kwargs):
        with torch.no_grad():
            result = ours(self, modelpool, **kwargs)
        return original(self, modelpool, **kwargs) if result is None else result

    run.__doc__ = (
        f"{cls.__name__}.run on fusion_kernels (fusion_kernels.compat.fusion_bench); FusionBench's own otherwise."
    )
    run.__wrapped__ = original
    return run


def install() -> list[str]:
    """Route FusionBench's averaging, task-arithmetic, TIES and DARE classes onto the engine; returns
    their names. Idempotent; needs fusion-bench 0.2.33 (``pip install fusion-kernels[fusion-bench]``)."""
    routed = []
    for module, name, ours in ROUTES:
        cls = getattr(importlib.import_module(module), name)
        if cls not in _originals:
            _originals[cls] = cls.run
            cls.run = _routed(cls, ours, cls.run)
        routed.append(name)
    return routed


def uninstall() -> None:
    """Give the classes back their own ``run``."""
    for cls, run in _originals.items():
        cls.run = run
    _originals.clear()


def installed() -> bool:
    return bool(_originals)
