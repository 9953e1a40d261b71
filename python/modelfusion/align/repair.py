"""REPAIR (Jordan et al., 2023): restore the unit statistics an interpolated network loses.

Averaging two aligned networks shrinks the variance of hidden units (their activations are not
perfectly correlated). REPAIR rescales each unit of the merged network so that, on data, its
pre-activation mean and standard deviation are the interpolation of the endpoints':

    μ* = (1 − α)·μ_A + α·μ_B,   σ* = (1 − α)·σ_A + α·σ_B
    W[c] ← W[c]·σ*_c/σ_c,       b[c] ← (b[c] − μ_c)·σ*_c/σ_c + μ*_c

one producing layer at a time, in network order (a layer's correction changes what later layers
see, never earlier ones). Networks with BatchNorm: :func:`reset_bn` recomputes its statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import swa_utils

from ..errors import ParameterError
from .matching import site_activations
from .spec import PermutationSpec


def _moments(model: nn.Module, sites: dict[str, str], data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    acts = site_activations(model, sites, data)
    return {p: (a.mean(1), a.std(1)) for p, a in acts.items()}


def endpoint_moments(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data: Iterable) -> tuple:
    """The endpoints' per-unit (mean, std) at each producing layer: REPAIR's targets for any α."""
    data = list(data)
    return _moments(model_a, spec.pre_sites, data), _moments(model_b, spec.pre_sites, data)


def repair(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    data: Iterable,
    alpha: float = 0.5,
    *,
    endpoints: tuple | None = None,
) -> nn.Module:
    """Rescales ``merged`` in place (and returns it); ``model_b`` must already be aligned to A.
    ``endpoints``: :func:`endpoint_moments` computed once for many α along a path."""
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    data = list(data)
    modules = dict(merged.named_modules())
    order = [name for name, _ in merged.named_modules()]
    layers = sorted(spec.pre_sites.items(), key=lambda item: order.index(item[1]))
    goal_a, goal_b = endpoints if endpoints is not None else endpoint_moments(model_a, model_b, spec, data)
    for p, name in layers:
        layer = modules[name]
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or layer.bias is None:
            raise ParameterError(f"repair: {name!r} must be an nn.Linear or nn.Conv2d with a bias, got {layer}")
        mean, std = _moments(merged, {p: name}, data)[p]
        goal_mean = (1 - alpha) * goal_a[p][0] + alpha * goal_b[p][0]
        goal_std = (1 - alpha) * goal_a[p][1] + alpha * goal_b[p][1]
        scale = goal_std / std.clamp(min=1e-8)
        with torch.no_grad():
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
            layer.bias.copy_(((layer.bias.float() - mean) * scale + goal_mean).to(layer.bias.dtype))
    return merged


def reset_bn(model: nn.Module, data: Iterable) -> nn.Module:
    """BatchNorm running statistics recomputed from ``data`` (``torch.optim.swa_utils.update_bn``)."""
    swa_utils.update_bn([b[0] if isinstance(b, (list, tuple)) else b for b in data], model)
    return model
