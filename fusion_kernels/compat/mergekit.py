"""mergekit 0.1.5's merge methods on fusion_kernels: one tensor at a time, and inside ``run_merge``.

The generalized task arithmetic family (``task_arithmetic``, ``ties``, ``dare_ties``,
``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``) is read from
the one method table, :mod:`fusion_kernels.methods`, which follows mergekit's
``GeneralizedTaskArithmeticMerge.merge_group``.

Known differences, all documented: we accumulate in float32 where mergekit computes in the base
dtype (bf16 models: our result is the more accurate one), and the random methods (DARE, DELLA)
draw from our counter-based hash (``seed``) instead of ``torch.bernoulli``; ``install()`` takes
that seed from torch's generator, so ``torch.manual_seed`` / ``MergeOptions.random_seed`` still
make a merge reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..methods import GTA_METHODS, METHODS, generalized_task_arithmetic
from ..ops.slerp import slerp as _slerp
from ..ops.weighted_sum import weighted_sum as _weighted_sum

__all__ = [
    "GTA_METHODS",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "generalized_task_arithmetic",
    "install",
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "uninstall",
]


def _preset(method: str):
    def merge(base, tensors, weights, **options) -> torch.Tensor:
        return generalized_task_arithmetic(method, base, tensors, weights, **options)

    merge.__name__ = merge.__qualname__ = method
    m = METHODS[method]
    merge.__doc__ = (
        f"mergekit's ``{method}`` for one tensor: sparsify={m.sparsify!r}, consensus={m.consensus!r}, "
        f"normalize={m.shared_params['normalize'].default}, rescale={m.shared_params['rescale'].default} "
        "by default. See ``fusion_kernels.methods.generalized_task_arithmetic``."
    )
    return merge


task_arithmetic = _preset("task_arithmetic")
ties = _preset("ties")
dare_ties = _preset("dare_ties")
dare_linear = _preset("dare_linear")
breadcrumbs = _preset("breadcrumbs")
breadcrumbs_ties = _preset("breadcrumbs_ties")
della = _preset("della")
della_linear = _preset("della_linear")


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear`` for one tensor: Σ wᵢ xᵢ (÷ Σ wᵢ when ``normalize``), in float32."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    if normalize:
        weights = [w / total for w in weights]
    return _weighted_sum(list(tensors), weights)


def slerp(
    t: float | torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's ``slerp(t, v0, v1)``: spherical interpolation of each slice along dim 0."""
    return _slerp(v0, v1, t, rowwise=True, dot_threshold=dot_threshold, eps=eps)


_BUILTINS: dict[str, Any] = {}


def _fused_method_class():
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    @dataclasses.dataclass(frozen=True)
    class FusedGeneralizedTaskArithmetic(GeneralizedTaskArithmeticMerge):
        """mergekit's method with ``merge_group`` on fusion_kernels; same name, parameters and spec."""

        builtin_name: str = ""

        def merge_group(self, group, /, **parameters):
            base, entries = group.base.tensor, group.non_base
            supported = (torch.float32, torch.float16, torch.bfloat16)
            if not entries or base.dtype not in supported or any(e.tensor.dtype != base.dtype for e in entries):
                return super().merge_group(group, **parameters)
            tensors = [base, *(e.tensor for e in entries)]
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return super().merge_group(group, **parameters)  # mergekit's own code is differentiable

            def per_entry(key, default=None):
                return [float(parameters[key][e.id]) for e in entries] if key in parameters else default

            random = METHODS[self.builtin_name].sparsify in ("random", "della")
            seed = int(torch.randint(0, 2**62, (1,)).item()) if random else 0
            return generalized_task_arithmetic(
                self.builtin_name,
                base,
                [e.tensor for e in entries],
                per_entry("weight"),
                density=per_entry("density"),
                normalize=bool(parameters["normalize"]),
                rescale=bool(parameters["rescale"]),
                lam=float(parameters["lambda"]),
                gamma=per_entry("gamma", 0.01),
                epsilon=per_entry("epsilon", 0.15),
                seed=seed,
            )

    return FusedGeneralizedTaskArithmetic


def install(methods: Sequence[str] = tuple(GTA_METHODS), *, prefix: str = "") -> list[str]:
    """Make mergekit (0.1.5, in this process) run ``methods`` on fusion_kernels.

    With ``prefix=""`` the built-in methods are swapped for fused ones under the same names, so
    existing recipes (``merge_method: ties``) and ``run_merge`` use our kernels; mergekit's
    ``register()`` refuses a name twice, so the swap goes through its registry table and
    ``uninstall()`` puts the built-ins back. With a prefix (e.g. ``"fk_"``) the fused methods are
    added through ``register()`` next to the built-ins. Returns the names registered.
    """
    from mergekit.merge_methods import registry

    fused_class = _fused_method_class()
    names = []
    for name in methods:
        if name not in GTA_METHODS:
            raise ValueError(f"methods: each must be one of {sorted(GTA_METHODS)}, got {name!r}")
        builtin = _BUILTINS.get(name) or registry.get(name)
        fields = {f.name: getattr(builtin, f.name) for f in dataclasses.fields(builtin)}
        fields.pop("builtin_name", None)
        fused = fused_class(**{**fields, "method_name": prefix + name}, builtin_name=name)
        if prefix:
            if prefix + name not in {m.spec.name for m in registry.registered_methods()}:
                registry.register(fused)
        else:
            _BUILTINS.setdefault(name, builtin)
            registry._METHODS[name] = fused
        names.append(prefix + name)
    return names


def uninstall() -> None:
    """Put back the mergekit built-ins that ``install()`` swapped out."""
    from mergekit.merge_methods import registry

    for name, builtin in _BUILTINS.items():
        registry._METHODS[name] = builtin
    _BUILTINS.clear()
