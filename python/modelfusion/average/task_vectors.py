"""Task-vector merges of whole models: the recipe methods of :mod:`modelfusion.pipeline`, in memory.

``merge(method, models, base, **parameters)`` takes the recipe's parameter names and defaults
(mergekit's), so a merge tried here gives the same tensors as the same recipe on checkpoints:

    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
    della_linear: per model ``weight`` (required), ``density``, ``gamma``, ``epsilon``; shared
    ``normalize``, ``rescale``, ``lambda`` (also ``lam=``)
    slerp: two models, ``t``; model_stock: ``filter_wise``

A per-model parameter is one number for all models or a list with one per model. DARE and DELLA
draw each tensor's masks from ``seed`` and the tensor's name, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ParameterError
from ..pipeline.methods import merge_tensor
from ..pipeline.plan import tensor_seed
from ..pipeline.recipe import GTA_METHODS, REQUIRED, model_params, shared_params
from .state import State, StateLike, aligned, merge_states

METHODS = (*GTA_METHODS, "slerp", "model_stock")


def _check(key: str, value, spec):
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not spec.lo <= value <= spec.hi:
        raise ParameterError(f"{key}: expected a number in [{spec.lo}, {spec.hi}], got {value!r}")
    return float(value)


def resolve_parameters(method: str, n: int, parameters: dict) -> dict:
    """The recipe parameters of ``method`` for ``n`` merged models: defaults filled in, ranges checked."""
    if method not in METHODS:
        raise ParameterError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    parameters = dict(parameters)
    if "lam" in parameters:
        parameters["lambda"] = parameters.pop("lam")
    per_model, shared = model_params(method), shared_params(method)
    unknown = set(parameters) - set(per_model) - set(shared)
    if unknown:
        raise ParameterError(
            f"{method}: unknown parameters {sorted(unknown)}; it takes {sorted({*per_model, *shared})}"
        )
    params = {}
    for key, spec in {**per_model, **shared}.items():
        value = parameters.get(key, spec.default)
        if value is REQUIRED:
            raise ParameterError(f"{method}: parameter {key!r} is required")
        if key in per_model:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ParameterError(f"{key}: expected one number or {n} (one per model), got {len(values)}")
            params[key] = [_check(f"{key}[{i}]", v, spec) for i, v in enumerate(values)]
        else:
            params[key] = _check(key, value, spec)
    return params


def merge(
    method: str, models: Sequence[StateLike], base: StateLike | None = None, *, seed: int = 0, **parameters
) -> State:
    """Merge ``models`` (fine-tunes of ``base``) with a recipe method; returns a new state dict.

    ``slerp`` takes two models and no base: θ = slerp(models[0], models[1], t).
    """
    if method == "slerp":
        if base is not None or len(models) != 2:
            raise ParameterError(
                f"slerp: expected two models and no base, got {len(models)} and base={base is not None}"
            )
        states = aligned(models, ["models[0]", "models[1]"])
        params = resolve_parameters(method, 1, parameters)
        return merge_states(states, lambda _, xs: merge_tensor("slerp", xs[0], xs[1:], params, seed))
    if base is None:
        raise ParameterError(f"{method}: expected a base model (the models' common pre-trained parent)")
    if method == "model_stock" and len(models) < 2:
        raise ParameterError(f"model_stock: expected at least two fine-tuned models, got {len(models)}")
    states = aligned([base, *models], ["base"] + [f"models[{i}]" for i in range(len(models))])
    params = resolve_parameters(method, len(models), parameters)
    return merge_states(states, lambda name, xs: merge_tensor(method, xs[0], xs[1:], params, tensor_seed(seed, name)))
