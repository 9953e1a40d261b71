"""Task-vector merges of whole models: the recipe methods of :mod:`fusion_kernels.methods`, in memory.

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

from fusion_kernels.methods import METHODS as TABLE
from fusion_kernels.methods import REQUIRED, merge_tensor, tensor_seed

from ..errors import ParameterError
from .state import State, StateLike, aligned, merge_states

METHODS = tuple(name for name, m in TABLE.items() if m.needs_base)


def resolve_parameters(method: str, n: int, parameters: dict) -> dict:
    """The parameters of ``method`` for ``n`` merged models: defaults filled in, ranges checked."""
    if method not in METHODS:
        raise ParameterError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    spec = TABLE[method]
    parameters = dict(parameters)
    if "lam" in parameters:
        parameters["lambda"] = parameters.pop("lam")
    unknown = set(parameters) - set(spec.params)
    if unknown:
        raise ParameterError(f"{method}: unknown parameters {sorted(unknown)}; it takes {sorted(spec.params)}")
    params = {}
    for key, param in spec.params.items():
        value = parameters.get(key, param.default)
        if value is REQUIRED:
            raise ParameterError(f"{method}: parameter {key!r} is required")
        if key in spec.model_params:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ParameterError(f"{key}: expected one number or {n} (one per model), got {len(values)}")
            params[key] = [param.check(v, f"{key}[{i}]") for i, v in enumerate(values)]
        else:
            params[key] = param.check(value, key)
    spec.check_values(params, "")
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
